"""torch.distributed set up once per process: a DeviceMesh with named axes ('dp', 'cfg', 'ring', 'ulysses').

    ctx = init_parallel(Degrees(ulysses=4))   # under torchrun; nccl on CUDA, gloo on CPU
    ctx.group("cfg"), ctx.sp_group             # None when that axis has one rank
    ctx.is_main                                # rank 0 writes files and decodes the video

On one process nothing is initialised and every getter answers for a single rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.compat import flatten_group

from .degrees import AXES, Degrees

_CONTEXTS: dict[Degrees, ParallelContext] = {}  # one mesh per degree layout, built once per process


@dataclass
class ParallelContext:
    degrees: Degrees = field(default_factory=Degrees)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: dist.device_mesh.DeviceMesh | None = None  # dims AXES
    sp_mesh: dist.device_mesh.DeviceMesh | None = None  # mesh['ring', 'ulysses']: what diffusers' CP config takes
    sp_group: dist.ProcessGroup | None = None  # ring x ulysses flattened: the ranks holding one video's tokens
    replica_group: dist.ProcessGroup | None = None  # cfg x ring x ulysses: the ranks making one video

    @property
    def replica_rank(self) -> int:
        return 0 if self.replica_group is None else dist.get_rank(self.replica_group)

    @property
    def is_leader(self) -> bool:
        """The replica's rank 0: decodes the video and returns the result."""
        return self.replica_rank == 0

    def leader_rank(self) -> int:
        """Global rank of this replica's leader (the source of its broadcasts)."""
        return self.rank if self.replica_group is None else dist.get_global_rank(self.replica_group, 0)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp_size(self) -> int:
        return self.degrees.sp

    @property
    def sp_rank(self) -> int:
        return 0 if self.sp_group is None else dist.get_rank(self.sp_group)

    def axis_rank(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; axes: {', '.join(AXES)}")
        return 0 if self.mesh is None else self.mesh.get_local_rank(axis)

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along `axis` that contains this rank, or None when the axis has one rank."""
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; axes: {', '.join(AXES)}")
        if self.mesh is None or getattr(self.degrees, axis) == 1:
            return None
        return self.mesh.get_group(axis)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def world_size_from_env() -> int:
    """Processes of this launch: the process group's, else torchrun's WORLD_SIZE (1 when not launched)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(degrees: Degrees, backend: str | None = None) -> ParallelContext:
    """Validate `degrees` against the launch, then (if several processes) init torch.distributed and the mesh.

    Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK. Calling it again with the same degrees returns the same
    context; other degrees get a second mesh over the same processes (tests use this).
    """
    degrees.validate(world_size_from_env())
    cuda = torch.cuda.is_available()
    if degrees.ring > 1 and not cuda:
        # diffusers' ring merges partial results by log-sum-exp, which only its CUDA backends return
        # (flash, _native_cudnn, _native_flash); the CPU 'native' backend does not.
        raise ValueError(f"ring degree {degrees.ring} needs CUDA attention kernels; on CPU use ulysses instead")
    if degrees in _CONTEXTS:
        return _CONTEXTS[degrees]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if degrees.world_size == 1:
        ctx = ParallelContext(degrees, device=device)
    else:
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
        mesh = dist.device_mesh.init_device_mesh(device.type, degrees.shape(), mesh_dim_names=AXES)
        sp_mesh = mesh["ring", "ulysses"]
        ctx = ParallelContext(
            degrees,
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            device,
            mesh,
            sp_mesh,
            flatten_group(sp_mesh) if degrees.sp > 1 else None,
            flatten_group(mesh["cfg", "ring", "ulysses"]) if degrees.replica > 1 else None,
        )
    _CONTEXTS[degrees] = ctx
    return ctx


def destroy_parallel() -> None:
    """End of the process: drop the meshes and the default process group."""
    _CONTEXTS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
