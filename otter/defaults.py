"""Where Otter's commands find their model when none is named, and what `otter-train` trains on by default.

The rule: `otter-train` writes its model to `<--output-dir>/model` (default `outputs/otter-tiny/model` under the
current directory) and, when it finishes, records that folder's absolute path in `~/.cache/otter/last-model`
(`$XDG_CACHE_HOME/otter/last-model`). `otter-generate`, `otter-chat`, `otter-demo` and `otter-serve`, run from
anywhere, use the recorded model while it still has weights, else the untrained tiny Otter (`tiny-otter`, the config
shipped in the package, with random weights).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_OTTER = "tiny-otter"
DEFAULT_OUTPUT_DIR = Path("outputs/otter-tiny")
# `otter-train --data`: the bundled toy data sets (otter.data.main_job), and the model each trains when `--model` is
# not given (video needs frame embeddings). The main job trains both abilities Otter is for: answering about the
# picture (vqa) and learning from the in-context examples (icl).
BUNDLED_DATA = ("toy", "toy-icl", "toy-mixture", "toy-video")
DEFAULT_DATA = "toy-mixture"
MODEL_FOR_DATA = {"toy-video": "tiny-otter-video"}
# Before the bundled in-context task, a language model built from scratch must learn to copy text
# (otter.data.copying), the skill a pretrained LLaMA brings to Otter: without it, the tiny Otter does not learn the
# task in thousands of steps. Copying by content forms suddenly, between steps 750 and 1250 of that pretraining
# (scripts/experiment_copying.py), hence 1500 steps. They are run once and shipped (scripts/make_tiny_copier.py):
# `otter-train --data toy-icl|toy-mixture` from scratch starts its language model from that copy, as Otter starts
# from LLaMA, unless `--copying-steps` asks to pretrain now. The VQA alone (`--data toy`) does not need it.
COPYING_STEPS = 1500
SHIPPED_COPIER = Path(__file__).resolve().parent / "assets" / "tiny-otter-copier"
DATA_NEEDING_COPYING = ("toy-icl", "toy-mixture")


def starts_from_copier(data: str, from_scratch: bool, copying_steps: int | None) -> bool:
    """Whether `otter-train` loads the shipped copier into its language model (`--copying-steps` not given)."""
    return copying_steps is None and from_scratch and data in DATA_NEEDING_COPYING


def model_to_train(data: str) -> str:
    """The model `otter-train --data DATA` trains when no `--model` is given."""
    return MODEL_FOR_DATA.get(data, TINY_OTTER)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otter"


def record_trained_model(folder: str | os.PathLike) -> None:
    """Called by `otter-train` once its model is saved; a cache that cannot be written only costs the default."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        (cache_dir() / "last-model").write_text(str(Path(folder).resolve()) + "\n")
    except OSError as error:
        logger.warning("could not record the trained model in %s: %s", cache_dir(), error)


def last_trained_model() -> Path | None:
    record = cache_dir() / "last-model"
    if not record.is_file():
        return None
    folder = Path(record.read_text().strip())
    return folder if any(folder.glob("*.safetensors")) else None


def default_model() -> str:
    """The model the last `otter-train` wrote, if it is still there; else the untrained tiny Otter."""
    trained = last_trained_model()
    return str(trained) if trained is not None else TINY_OTTER


def describe_default() -> str:
    """For `--model`'s help text."""
    return "the model the last otter-train wrote, else an untrained tiny Otter"


__all__ = ["COPYING_STEPS", "DATA_NEEDING_COPYING", "DEFAULT_OUTPUT_DIR", "SHIPPED_COPIER", "TINY_OTTER", "default_model",
           "describe_default", "last_trained_model", "record_trained_model", "starts_from_copier"]
