"""Few-shot evaluation of Flamingo-style models (OpenFlamingo's benchmark protocol), as an API and `flamingo-eval`.

    from flamingo.eval import evaluate, load_task
    results = evaluate(model, processor, load_task("coco", "data/coco"), shots=[0, 4, 8], trials=3)
    results.to_json()["shots"]["4"]["mean"]

See `flamingo.eval.runner` for the protocol, `flamingo.eval.tasks` for the data formats.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy, like the package itself: `flamingo-eval --help` (flamingo/eval/cli.py) must not import torch.
_PUBLIC = {
    "BUILTIN_TASKS": "tasks", "Example": "tasks", "Task": "tasks", "TaskDataError": "tasks", "load_task": "tasks",
    "Results": "runner", "TrialResult": "runner", "evaluate": "runner", "markdown_table": "runner",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flamingo.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
