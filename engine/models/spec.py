"""The shape of model knowledge: what a model family module (wan.py, hunyuan15.py) fills in, as data and a few
small functions. No model is named here.

  FISAdapter   where the blocks are and which block arguments carry tokens (the FIS hooks read it)
  AttentionSite  a block's self-attention module, for the FIS operators that make only the self-attention sparse
  SPPlan       where tokens are born, positioned and leave (sequence parallelism reads it)
  ModelFamily  both, plus everything else the engine must know of one architecture: preset family, FLOPs
               dimensions, default size, prompt encoding, pipeline fixes, single-process optimisations
  BlockArgs    a block's arguments by name, whether passed by position or keyword
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SliceRule:
    """A block argument that holds one entry per video token along `dim` (frame-major, F * HW tokens): FIS slices it
    to the anchor frames together with the hidden states. Arguments without a rule (text context, per-sample temb)
    pass through whole."""

    dim: int = 1
    ndim: int | None = None  # slice only tensors of this rank (Wan temb: [B, N, 6, C] vs [B, 6, C])
    reuse: bool = False  # the same tensor for every block of one forward: slice once per anchor set


def patch_tuple(config) -> tuple[int, int, int]:
    return tuple(config.patch_size)  # Wan: (p_t, p_h, p_w)


@dataclass(frozen=True)
class AttentionSite:
    """A block's self-attention module, as the attention-scope FIS operators (fis/operators.py: 'attn', 'kv') reach
    it: the block runs on every frame and a hook on this module makes the self-attention sparse.

    'attn' slices `hidden` and the `per_frame` arguments to the anchor frames and calls the module as it is; 'kv'
    calls `split(attn, args, kwargs, names, keys)`: the module's own computation with the queries of every token and
    the keys and values of the tokens keys(x, dim) selects (x holds every token along dim, frame-major), returning
    what the module returns. `split` is the one piece of model code FIS needs: diffusers' processors take one token
    set for queries and keys; with `keys` the identity it must equal the module's own output."""

    module: str  # the block's submodule
    hidden: str = "hidden_states"  # its argument with the video tokens [B, F*HW, C]
    per_frame: dict[str, SliceRule] = field(default_factory=dict)  # its per-token arguments (RoPE)
    output_index: int | None = None  # a tuple output: where the video tokens are
    split: Callable | None = None


@dataclass(frozen=True)
class FISAdapter:
    name: str
    blocks_attr: str  # nn.ModuleList of transformer blocks
    hidden: str  # block argument with the video tokens [B, F*HW, C]
    per_frame: dict[str, SliceRule] = field(default_factory=dict)
    output_index: int | None = None  # the block returns a tuple; this element holds the video tokens
    patch: Callable = patch_tuple  # config -> (p_t, p_h, p_w)
    input_arg: str = "hidden_states"  # transformer argument [B, C, F, H, W]
    attention: AttentionSite | None = None  # None: only the block-scope operators (linear, residual)

    def geometry(self, transformer, latents) -> tuple[int, int]:
        """(latent frames after patching, tokens per frame) from the transformer input."""
        p_t, p_h, p_w = self.patch(transformer.config)
        _, _, f, h, w = latents.shape
        return f // p_t, (h // p_h) * (w // p_w)


@dataclass(frozen=True)
class SPPlan:
    """Where a transformer's tokens are born, positioned and leave (module names), as data."""

    embed: str  # output [B, C, F, H, W]: the patch-embedded video (the conv, before any flatten)
    rope: str  # output: tuple of per-token tables, token axis rope_dim
    out: str  # output [B, N, C]: the last per-token layer before unpatchify
    per_token_inputs: tuple[str, ...] = ()  # transformer arguments shaped [B, N] when given per token
    rope_dim: int = 1
    # joint attention over [video, text]: transformer -> (processors, undo), installing the family's attention
    # processors that sequence parallelism then gives its attention step (parallel/joint.py); None: Wan-style
    # self-attention, parallelised by diffusers' dispatcher alone
    joint_attention: Callable | None = None


def _none(*_args, **_kwargs):
    return None


@dataclass(frozen=True)
class ModelFamily:
    """Everything the engine knows about one architecture. The registry (engine/models/__init__.py) finds a
    family by its transformer class; nothing outside engine/models/ compares model names.

    preset_family(config) -> 'wan-14b' etc., or None: the configs/fis preset family of a real size
    dims(config, vae_s, vae_t, text_len) -> fis.DiTDims: the architecture as the FLOPs counter sees it
    default_size(pipe) -> (height, width) for a real-size model (small models: the loader's CPU-friendly size)
    encode_text(pipe, prompt, negative, cfg, device) -> the pipeline call's embedding keyword arguments
    text_len(pipe) -> context tokens the FLOPs counter counts
    prepare_pipeline(pipe) -> None: fixes applied once to a loaded pipeline
    optimise(transformer) -> undo or None: single-process speed-ups applied by the runtime (exact)
    fp8_keep(config) -> block indices `--quantize fp8` leaves in bf16 (measured as sensitive), or None: none
    fps: frames per second of the family's videos (what `seconds` in a request converts with, and the mp4's rate)
    size_multiple: what the family's pipelines demand of height and width themselves, beyond VAE x patch (Wan's
        check_inputs wants multiples of 16 whatever the VAE): validation checks both before any work
    """

    name: str
    transformer_class: str
    adapter: FISAdapter
    sp_plan: SPPlan
    preset_family: Callable
    dims: Callable
    default_size: Callable
    encode_text: Callable
    text_len: Callable
    prepare_pipeline: Callable = _none
    optimise: Callable = _none
    fp8_keep: Callable = _none
    fps: int = 16
    size_multiple: int = 1


class BlockArgs:
    """Reads and replaces a block's arguments by name, whether passed by position or keyword."""

    def __init__(self, block):
        names = list(inspect.signature(type(block).forward).parameters)[1:]  # drop self
        self._pos = {n: i for i, n in enumerate(names)}

    def get(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self._pos.get(name)
        return args[i] if i is not None and i < len(args) else None

    def set(self, name, value, args: list, kwargs: dict):
        i = self._pos.get(name)
        if name in kwargs or i is None or i >= len(args):
            kwargs[name] = value
        else:
            args[i] = value
