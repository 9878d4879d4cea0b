"""Few-shot evaluation of Flamingo-style models (OpenFlamingo's benchmark protocol), as an API and `flamingo-eval`.

    from flamingo.eval import evaluate, load_task
    results = evaluate(model, processor, load_task("coco", "data/coco"), shots=[0, 4, 8], trials=3)
    results.to_json()["shots"]["4"]["mean"]

See `flamingo.eval.runner` for the protocol, `flamingo.eval.tasks` for the data formats.
"""

from .runner import Results, TrialResult, evaluate, markdown_table
from .tasks import BUILTIN_TASKS, Example, Task, TaskDataError, load_task

__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "Results",
    "Task",
    "TaskDataError",
    "TrialResult",
    "evaluate",
    "load_task",
    "markdown_table",
]
