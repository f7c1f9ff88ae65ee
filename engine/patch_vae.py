"""Moved to engine.models.patch_vae. Pipelines saved before the move name this module in their
model_index.json (["engine.patch_vae", "PatchVAE"]), so it stays importable."""

# diffusers finds a custom component's loading methods through the base classes its module holds
from diffusers.configuration_utils import ConfigMixin  # noqa: F401
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from engine.models.patch_vae import PatchVAE

__all__ = ["PatchVAE"]
