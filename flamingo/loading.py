"""The one way a command gets a model and its processor.

A model is named by
- a folder written by `save_pretrained` (weights + processor), or one with only a `config.json`, which gives a
  randomly initialised model of that config (the tiny defaults: untrained, seeded, said in the log);
- a shipped config by its name (`tiny-otter`, `otter-9b-llama`, `openflamingo-9b-llama`, ...: see `named_config`);
- a hub id (`luodian/OTTER-Image-LLaMA7B-LA-InContext`).

The published checkpoints ship no tokenizer: `tokenizer=` names the base LM's, to which the model type's special
tokens are added in the published order. The class comes from the config's `model_type` through transformers'
Auto registry, so flamingo code loads Otter folders (the `otter` plugin registers itself, see `flamingo.registry`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from .local_files import looks_like_local_path
from .modeling_flamingo import FlamingoPreTrainedModel
from .processing_flamingo import FlamingoProcessor
from .registry import load_plugins

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FILES = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class Loaded:
    model: FlamingoPreTrainedModel
    processor: FlamingoProcessor
    trained: bool  # False for a model built from a config with random weights
    name: str


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether a local folder holds a checkpoint, or only a config (the tiny defaults)."""
    folder = Path(folder)
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES)


def named_config(name: str) -> Path | None:
    """The shipped folder called `name` (`tiny-otter`, `otter-9b-llama`, ...) in flamingo's or a plugin's assets."""
    for assets in load_plugins():
        if (assets / name / "config.json").is_file():
            return assets / name
    return None


def shipped_names() -> list[str]:
    return sorted(p.parent.name for assets in load_plugins() for p in assets.glob("*/config.json"))


def resolve(name: str | os.PathLike) -> str:
    """A local folder, a shipped config's folder, or a hub id, as a string for `from_pretrained`. A name that can
    only be a local path (it exists as a file, starts with `.`, `/` or `~`, or has more than one `/`) but is no
    folder is an error here rather than a hub error about repo ids."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if (shipped := named_config(text)) is not None:
        return str(shipped)
    if path.exists():
        raise NotADirectoryError(f"model {text!r} is a file; expected a folder with config.json, a shipped config "
                                 f"({', '.join(shipped_names())}) or a hub id")
    if looks_like_local_path(text):
        raise FileNotFoundError(f"model folder {text!r} does not exist (nor is it a shipped config: "
                                f"{', '.join(shipped_names())})")
    return text


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_config(name: str | os.PathLike) -> PretrainedConfig:
    """The config of a folder, shipped name or hub id, of any registered model type (plugins included)."""
    load_plugins()
    source = resolve(name)
    try:
        return AutoConfig.from_pretrained(source)
    except ValueError as error:
        if "model type" in str(error) or "Unrecognized" in str(error):
            raise ValueError(f"{source}: {error} (is the package that defines this model type installed? "
                             f"`pip install flamingo-otter-hf` registers flamingo and otter)") from error
        raise


def load_model(
    name: str | os.PathLike,
    *,
    device_map: str | dict | None = None,
    dtype: str | torch.dtype = "float32",
    load_in_8bit: bool = False,
    seed: int = 0,
) -> FlamingoPreTrainedModel:
    """A model in eval mode. A folder with only a config gives an untrained model, initialised from `seed`;
    `load_in_8bit` quantizes the language model's layers with bitsandbytes (vision tower, perceiver and
    cross-attention stay unquantized) and needs a checkpoint with weights."""
    source, dtype = resolve(name), torch_dtype(dtype)
    if Path(source).is_dir() and not has_weights(source):
        if load_in_8bit:
            raise ValueError(f"--load-in-8bit needs a checkpoint with weights; {source} has only a config")
        logger.warning("%s has no weights: building an untrained model from its config", source)
        config = load_config(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(config)
        return model.to(dtype).eval()
    load_config(source)  # a clear error for an unknown model type before transformers' own
    kwargs = {}
    if load_in_8bit:
        from transformers import BitsAndBytesConfig  # pip install "flamingo-otter-hf[quantization]"

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        device_map = device_map or "auto"
    return AutoModelForImageTextToText.from_pretrained(source, device_map=device_map, dtype=dtype, **kwargs).eval()


def load_processor(name: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> FlamingoProcessor:
    """The processor saved with the model, or, with `tokenizer`, one built from the base LM's tokenizer (for the
    published checkpoints, which ship none); configured for the model's frame embeddings (`configure_for`)."""
    source = resolve(name)
    config = load_config(source)
    processor_class = PROCESSOR_MAPPING[type(config)]
    if tokenizer is not None:
        processor = processor_class.from_base_tokenizer(resolve_tokenizer(tokenizer))
    elif Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{source} has no tokenizer: pass the base language model's tokenizer "
                                "(--tokenizer, e.g. luodian/llama-7b-hf for the published LLaMA checkpoints)")
    else:
        processor = processor_class.from_pretrained(source)
    return processor.configure_for(config)  # clips sampled to the model's frame embeddings, refused by image models


def resolve_tokenizer(name: str | os.PathLike) -> str:
    """`tokenizer=` also takes the shipped `tiny-tokenizer` by name."""
    text = str(name)
    shipped = Path(__file__).resolve().parent / "assets" / text
    return str(shipped) if not Path(text).exists() and (shipped / "tokenizer_config.json").is_file() else text


def load_model_and_processor(
    name: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    device_map: str | dict | None = None,
    dtype: str | torch.dtype = "float32",
    load_in_8bit: bool = False,
) -> Loaded:
    source = resolve(name)
    model = load_model(source, device_map=device_map, dtype=dtype, load_in_8bit=load_in_8bit)
    processor = load_processor(source, tokenizer=tokenizer)
    if model.config.context_length:  # so that the processor refuses a prompt the model cannot take
        processor.tokenizer.model_max_length = model.config.context_length
    return Loaded(model, processor, trained=not Path(source).is_dir() or has_weights(source), name=str(name))


__all__ = ["Loaded", "has_weights", "load_config", "load_model", "load_model_and_processor", "load_processor",
           "named_config", "resolve"]
