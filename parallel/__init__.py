"""One video over several processes: sequence parallelism (diffusers' Ulysses / ring attention) with a
FIS-friendly token layout, plus CFG parallelism.

    ctx = init_parallel(Degrees(cfg=1, ulysses=4))           # under torchrun
    state = apply_fis(pipe.transformer, FISConfig(...))       # FIS first ...
    handle = parallelize_pipeline(pipe, ctx, shard="spatial") # ... then parallelism
    latents = pipe(..., output_type="latent").frames          # whole latents on every rank
    handle.remove(); remove_fis(pipe.transformer)             # undo in reverse order
"""

from .context import ParallelContext, destroy_parallel, init_parallel, world_size_from_env
from .degrees import AXES, Degrees
from .layout import MODES, TokenLayout
from .parallelize import ParallelHandle, parallelize_pipeline, parallelize_transformer

__all__ = [
    "AXES",
    "MODES",
    "Degrees",
    "ParallelContext",
    "ParallelHandle",
    "TokenLayout",
    "destroy_parallel",
    "init_parallel",
    "parallelize_pipeline",
    "parallelize_transformer",
    "world_size_from_env",
]
