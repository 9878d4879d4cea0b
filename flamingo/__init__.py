"""Flamingo-style vision-language models (OpenFlamingo) as Hugging Face transformers models.

Imports are lazy: `import flamingo` is instant, and the first use of a class (`from flamingo import FlamingoModel`)
imports torch and transformers and registers `model_type="flamingo"` with the Auto classes.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

_PUBLIC = {
    "FlamingoConfig": "configuration_flamingo",
    "FlamingoModel": "modeling_flamingo",
    "FlamingoPreTrainedModel": "modeling_flamingo",
    "MediaCache": "modeling_flamingo",
    "FlamingoProcessor": "processing_flamingo",
}
__all__ = [*_PUBLIC, "register"]


@functools.cache
def register() -> None:
    """Register the `flamingo` model type with transformers' Auto classes (done on first use of a class)."""
    from .configuration_flamingo import FlamingoConfig
    from .modeling_flamingo import FlamingoModel
    from .processing_flamingo import FlamingoProcessor
    from .registry import register_model_type

    register_model_type(FlamingoConfig, FlamingoModel, FlamingoProcessor)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flamingo' has no attribute {name!r}")
    register()
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
