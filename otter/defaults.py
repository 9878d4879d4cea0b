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
# Before the bundled in-context task, a language model built from scratch first learns to copy text
# (otter.data.copying), the skill a pretrained LLaMA brings to Otter: without it, the tiny Otter does not learn the
# task in thousands of steps. Copying by content forms suddenly, between steps 750 and 1250 of that pretraining
# (scripts/experiment_copying.py), hence 1500. The VQA alone (`--data toy`) does not need it.
COPYING_STEPS_FOR_DATA = {"toy-icl": 1500, "toy-mixture": 1500}


def copying_steps_for(data: str, from_scratch: bool) -> int:
    """`otter-train --copying-steps`' default."""
    return COPYING_STEPS_FOR_DATA.get(data, 0) if from_scratch else 0


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


__all__ = ["COPYING_STEPS_FOR_DATA", "DEFAULT_OUTPUT_DIR", "TINY_OTTER", "copying_steps_for", "default_model",
           "describe_default", "last_trained_model", "record_trained_model"]
