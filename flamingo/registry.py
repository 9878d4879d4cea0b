"""Tells transformers' Auto classes about a Flamingo-style model type, and finds the packages that add one.

The packages import lazily (so that a command's `--help` does not import torch): a model type is registered
the first time one of its classes is used (`from otter import OtterModel`), or by `flamingo.loading`, which
also registers every plugin that declares itself under the `flamingo.model_types` entry point group (the
`otter` package does), so that code on the flamingo side loads an Otter folder without importing otter.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import FlamingoPreTrainedModel
from .processing_flamingo import FlamingoProcessor

PLUGIN_GROUP = "flamingo.model_types"
FLAMINGO_ASSETS = Path(__file__).resolve().parent / "assets"


def register_model_type(
    config_class: type[FlamingoConfig], model_class: type[FlamingoPreTrainedModel], processor_class: type[FlamingoProcessor]
) -> None:
    """`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor` resolve `config_class.model_type`."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)


@functools.cache
def load_plugins() -> tuple[Path, ...]:
    """Registers every installed plugin's model types; returns the asset folders of flamingo and the plugins
    (named configs such as `otter-9b-llama` live there). A plugin entry point names a function that registers its
    types and returns its asset folder."""
    from . import register

    register()
    folders = [FLAMINGO_ASSETS]
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        folders.append(Path(entry.load()()))
    return tuple(folders)


def classes_of(model_type: str) -> tuple[type[FlamingoConfig], type[FlamingoPreTrainedModel], type[FlamingoProcessor]]:
    """Config, model and processor classes of a registered Flamingo-style model type (`flamingo`, `otter`, ...)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    load_plugins()
    known = model_types()
    if model_type not in known:
        raise ValueError(f"unknown model type {model_type!r}; registered Flamingo-style types: {', '.join(known)}")
    config_class = CONFIG_MAPPING[model_type]
    return config_class, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class], PROCESSOR_MAPPING[config_class]


def model_types() -> list[str]:
    """The registered model types whose config is a `FlamingoConfig`."""
    from transformers import CONFIG_MAPPING

    load_plugins()
    return sorted(t for t, c in CONFIG_MAPPING._extra_content.items() if issubclass(c, FlamingoConfig))
