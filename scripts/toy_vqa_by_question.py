"""Where a trained main job goes wrong on the toy VQA: held-out answers right per question type, and the most common
mistakes, for each `otter-train` output folder given.

    python scripts/toy_vqa_by_question.py outputs/otter-tiny
    python scripts/toy_vqa_by_question.py benchmark-main-job/threads2-seed*

Scores each folder's `model/` on its `heldout/vqa/task.json` with flamingo-eval's runner (greedy, each query after
its episode's examples: the `with_examples` number of summary.json), then counts by question.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from otter.data.toy import QUESTION_TYPES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="otter-train --output-dir folders")
    parser.add_argument("--mistakes", type=int, default=3, help="most common (question, answer, said) per run")
    return parser.parse_args()


def by_question(run: Path) -> tuple[Counter, Counter, Counter]:
    """(right, asked) per question type and the mistakes as (type, answer, prediction), for one run."""
    from flamingo.eval.metrics import normalize_vqa_answer
    from flamingo.eval.tasks import load_task
    from otter import OtterModel, OtterProcessor
    from otter.evaluate import run_episodes

    task = load_task(run / "heldout" / "vqa" / "task.json")
    model = OtterModel.from_pretrained(run / "model").eval()
    predictions = run_episodes(model, OtterProcessor.from_pretrained(run / "model"), task).predictions
    right, asked, mistakes = Counter(), Counter(), Counter()
    for item, prediction in zip(task.test, predictions, strict=True):
        kind, said = QUESTION_TYPES[item.fields["question"]], prediction["prediction"].strip()
        asked[kind] += 1
        if normalize_vqa_answer(said) == normalize_vqa_answer(item.answer):  # the exact match of the score
            right[kind] += 1
        else:
            mistakes[kind, item.answer, said] += 1
    return right, asked, mistakes


def main() -> None:
    args = parse_args()
    kinds = list(dict.fromkeys(QUESTION_TYPES.values()))
    print(f"{'run':<24}" + "".join(f"{kind:>10}" for kind in kinds) + "   most common mistakes (type: answer -> said)")
    for run in args.runs:
        right, asked, mistakes = by_question(run)
        common = ", ".join(f"{k}: {a} -> {s} x{n}" for (k, a, s), n in mistakes.most_common(args.mistakes))
        print(f"{run.name:<24}" + "".join(f"{f'{right[k]}/{asked[k]}':>10}" for k in kinds) + f"   {common}")


if __name__ == "__main__":
    main()
