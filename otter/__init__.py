"""Otter: the in-context instruction-tuned Flamingo, as a Hugging Face transformers model.

Imports are lazy, as in `flamingo`: the first use of a class (`from otter import OtterModel`) registers
`model_type="otter"` with the Auto classes.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
_PUBLIC = {"OtterConfig": "configuration_otter", "OtterModel": "modeling_otter", "OtterProcessor": "processing_otter"}
__all__ = [*_PUBLIC, "register", "ASSETS"]


@functools.cache
def register() -> Path:
    """Register the `otter` model type with transformers' Auto classes; returns the folder of Otter's shipped
    configs (the `flamingo.model_types` entry point calls this)."""
    from flamingo.registry import register_model_type

    from .configuration_otter import OtterConfig
    from .modeling_otter import OtterModel
    from .processing_otter import OtterProcessor

    register_model_type(OtterConfig, OtterModel, OtterProcessor)
    return ASSETS


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'otter' has no attribute {name!r}")
    register()
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
