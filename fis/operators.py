"""The FIS operators: what a sparse (block, step) computes on the anchor frames and how every frame gets its output.

The paper (Eq. 7-10) runs the whole block on the anchors and interpolates the skipped frames' outputs. Measured on
the embedded model, a skipped frame then keeps its own noise (docs/eval): at the sparse steps a block's update is
largely frame-specific noise removal, which no neighbour's output can supply. The attention-scope operators keep
the part of the block that is cheap per token (modulation, norms, cross-attention, FFN: linear in the token count)
on every frame and make only the quadratic self-attention sparse, so every frame gets its own update:

  scope 'block'      the block runs on the anchors only (paper Eq. 7-9); `rebuild` makes the skipped frames:
    linear             Eq. 10 on the anchors' block outputs
    residual           Eq. 10 on the anchors' updates y - x, added to the skipped frame's own input x_f
  scope 'attention'  the block runs on every frame; its self-attention is sparse:
    attn               the self-attention module runs on the anchors only (anchors attend to anchors, as in
                       'block' scope); a skipped frame's attention output is Eq. 10 of its neighbouring anchors'
    kv                 every frame's queries attend to the anchors' keys and values only: Q and the output
                       projection on every token, K and V on the anchor tokens, scores N x N_a

Pure data: engine/hooks/fis.py runs them, fis/flops.py counts them (`Operator.self_attention` says which tokens
enter the self-attention as queries and as keys).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Operator:
    name: str
    scope: str  # 'block' | 'attention'
    queries: str  # whose queries enter the self-attention: 'anchors' | 'all'
    rebuild: str | None  # interpolation of the skipped frames: 'linear' | 'residual' (of what scope says); None
    summary: str  # one line, for --help and docs

    def self_attention(self, tokens: int, anchor_tokens: int) -> tuple[int, int]:
        """(query tokens, key/value tokens) entering the self-attention of a sparse block."""
        return (anchor_tokens if self.queries == "anchors" else tokens), anchor_tokens

    @property
    def per_frame(self) -> bool:
        """Every frame runs the block's per-token parts (modulation, norms, cross-attention, FFN)."""
        return self.scope == "attention"


_ALL = (
    Operator("linear", "block", "anchors", "linear", "interpolate the anchors' block outputs (paper Eq. 10)"),
    Operator(
        "residual",
        "block",
        "anchors",
        "residual",
        "interpolate the anchors' updates y - x and add them to each skipped frame's own input",
    ),
    Operator(
        "attn",
        "attention",
        "anchors",
        "linear",
        "every frame runs the block; self-attention on the anchors only, its output interpolated",
    ),
    Operator(
        "kv",
        "attention",
        "all",
        None,
        "every frame runs the block; its queries attend to the anchors' keys and values only",
    ),
)
REGISTRY: dict[str, Operator] = {op.name: op for op in _ALL}
OPERATORS: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Operator:
    return REGISTRY[name]
