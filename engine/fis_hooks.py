"""Moved to engine.hooks.fis (kept so that `from engine.fis_hooks import apply_fis` goes on working)."""

from engine.hooks.fis import *  # noqa: F403
from engine.hooks.fis import BLOCK_HOOK, MODEL_HOOK, FISBlockHook, FISModelHook, FISState, apply_fis, remove_fis

__all__ = ["BLOCK_HOOK", "MODEL_HOOK", "FISBlockHook", "FISModelHook", "FISState", "apply_fis", "remove_fis"]
