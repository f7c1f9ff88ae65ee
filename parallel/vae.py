"""VAE decode over every rank of a replica (its CFG and sequence-parallel ranks), exact, from DistVAE.

The denoising loop leaves identical latents on every rank of a replica, and the decoder was the one part that ran
on the leader alone (2.8 s at 480p, ~6.5 s at 720p for Wan 2.2 A14B on an H200: more than the whole 4-GPU FIS DiT).
DistVAE (`distvae`, xDiT's patch-parallel VAE) rebuilds a diffusers decoder out of sharded convolutions,
norms and attentions: each rank decodes one band of rows, every convolution exchanges halo rows with its
neighbours, norms reduce their statistics over the ranks and the mid-block attention (at latent resolution, the
cheapest point of the decoder) gathers the whole frame. That is the one-process decode, not an approximation of it:
equal within float rounding (tests/scenarios.py: `vae_decode`).

Why not diffusers' tiling spread over the ranks (what cache-dit and ParaAttention do)? Tiles overlap and are
blended: the result differs from the untiled decode at every seam, and the overlap is decoded twice (Wan's default
tile 256 px, stride 192 px, recomputes ~1/3 of every tile), so a 1/4 share costs more than a quarter. Tiling is a
memory tool; halo sharding divides the work and the activation memory by the rank count and stays exact.

Two changes to DistVAE's wiring, both through its public objects:
  * its DePatchify all-gathers the output, so every rank would end up holding the whole video. `_GatherToLeader`
    takes its place: the leader (replica rank 0, which writes the video) receives every band, the others keep only
    their own rows. No rank holds more than its share plus halos (and the leader the video it writes).
  * the sharded decoder is built on a copy of the decoder's modules that shares their parameters, so the whole
    decoder stays available at no memory cost: a request whose latent rows cannot be split over the ranks (DistVAE
    refuses bands thinner than a unit or than a halo) is decoded by the leader alone, as before.

Nothing is model-specific here: DistVAE recognises the VAE family by its blocks (Wan 2.1, Wan 2.2's 48-channel VAE
with its patchify, HunyuanVideo 1.5). A VAE it has no adapter for (the embedded model's linear patch VAE), a tiled
VAE, or a missing `distvae` package: the leader decodes alone and `reason` says why.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .context import ParallelContext

MISSING = "the distvae package is not installed (pip install 'fis-engine[vae]')"


class _GatherToLeader(torch.nn.Module):
    """In place of DistVAE's DePatchify: the leader gets the whole decoded chunk, every other rank its own rows."""

    def __init__(self, group, leader: int, dim: int = -2):
        super().__init__()
        self.group, self.leader, self.dim = group, leader, dim
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def forward(self, band: torch.Tensor) -> torch.Tensor:  # [B, C, F, h_r, W]: this rank's rows
        dim = self.dim % band.ndim
        sizes = [torch.zeros(1, dtype=torch.int64, device=band.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([band.shape[dim]], device=band.device), group=self.group)
        sizes = [int(s.item()) for s in sizes]  # one host sync per decoded chunk (a latent frame), none per layer
        pad = [0, 0] * (band.ndim - dim - 1) + [0, max(sizes) - band.shape[dim]]
        sent = F.pad(band, pad).contiguous()  # equal shapes for the collective; the padding never reaches a conv
        if self.rank != 0:
            dist.gather(sent, None, dst=self.leader, group=self.group)
            return band
        parts = [torch.empty_like(sent) for _ in range(self.world)]
        dist.gather(sent, parts, dst=self.leader, group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)  # [B, C, F, H, W]


def _sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s structure that shares its parameters and buffers (no tensor is copied)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


class ParallelDecoder:
    """What parallelize_vae attached. `ranks` decode one video together (1: the leader alone, `reason` says why);
    `decoding(latent_rows)` puts the decoder for one request in place and yields the ranks that decode it."""

    def __init__(self, vae, ctx: ParallelContext, enabled: bool = True):
        self.vae, self.ctx, self.enabled = vae, ctx, enabled
        self.whole = getattr(vae, "decoder", None)
        self.sharded = None
        self.adapter: str | None = None
        self.reason: str | None = None
        self.ranks = 1
        self._attach()

    def _attach(self) -> None:
        ctx, vae = self.ctx, self.vae
        if not self.enabled:
            self.reason = "off (vae_parallel = off)"
            return
        if vae is None or ctx.replica_group is None:
            self.reason = "one rank per replica"
            return
        try:
            from distvae.vae import decoder_adapter_name, parallelize_decoder
        except ImportError:
            self.reason = MISSING
            return
        if getattr(vae, "use_tiling", False):
            self.reason = "the VAE decodes in tiles (enable_tiling); tiles are not sharded"
            return
        self.adapter = decoder_adapter_name(vae)
        if self.adapter is None:
            self.reason = f"DistVAE has no decoder adapter for {type(vae).__name__}"
            return
        vae.decoder = _sharing_copy(self.whole)
        try:
            parallelize_decoder(vae, ctx.replica_group)  # vae.decoder := the adapter around the copy
            self.sharded = vae.decoder
        finally:
            vae.decoder = self.whole
        self.sharded.depatchify = _GatherToLeader(ctx.replica_group, ctx.leader_rank())
        self.ranks = dist.get_world_size(ctx.replica_group)

    def fits(self, latent_rows: int) -> bool:
        """Can DistVAE split `latent_rows` over the ranks? Its own band rule, asked on a meta tensor."""
        if self.sharded is None:
            return False
        patchify = getattr(self.sharded, "patchify", None)
        if patchify is None:
            return True
        try:
            patchify(torch.empty(1, 1, 1, latent_rows, 1, device="meta"))
        except ValueError:  # VAERowSplitError is a ValueError, as are the too-few-rows and halo refusals
            return False
        return True

    @contextlib.contextmanager
    def decoding(self, latent_rows: int):
        """The sharded decoder in place for one decode of `latent_rows` latent rows, if they split over the ranks;
        yields the number of ranks that decode (1: the leader decodes alone, the others skip the decode)."""
        if not self.fits(latent_rows):
            yield 1
            return
        self.vae.decoder = self.sharded
        try:
            yield self.ranks
        finally:
            self.vae.decoder = self.whole

    def describe(self) -> dict:
        return {"ranks": self.ranks, "adapter": self.adapter, "reason": self.reason}


def parallelize_vae(vae, ctx: ParallelContext, enabled: bool = True) -> ParallelDecoder:
    """Prepare `vae` to decode over ctx's replica ranks (see the module docstring); a no-op in one process or when
    not enabled. Cast the VAE to its decode dtype first: the sharded copy shares parameters, not a later `.to()` of
    buffers."""
    return ParallelDecoder(vae, ctx, enabled)
