"""Text that teaches a language model built from scratch to copy: random token sequences, said twice.

Otter's in-context learning rests on a skill its pretrained LLaMA brings: finding an earlier occurrence of what it is
reading and continuing as it continued (induction heads). The tiny Otter of the main job starts from random weights,
and on the in-context task alone it does not find that skill in the steps the main job has; a few hundred steps of
pure copying give it first, as pretraining gave it to LLaMA (`otter-train --copying-steps`).

    tokens:  t1 t2 ... tL t1 t2 ... tL
    labels:  -100 ...  -100 t2 ... tL   (the repeat, after its first token: only copying predicts it)
"""

from __future__ import annotations

import torch

from .collate import IGNORE_INDEX

SEQUENCE_LENGTH = 16
# The pretraining's batch, whatever `--batch-size` is: with 32, the experiment learned the in-context task in 3 runs of
# 3; with 16, in 2 of 5 (README, "In-context learning").
BATCH_SIZE = 32


def copying_batch(vocab_size: int, batch_size: int, generator: torch.Generator,
                  length: int = SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` of `batch_size` random sequences of ids in [3, vocab_size) (no BOS/EOS/UNK), each
    repeated once; `vocab_size` should stop below the added special tokens."""
    tokens = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    input_ids = torch.cat([tokens, tokens], dim=1)  # (batch, 2 * length)
    labels = input_ids.clone()
    labels[:, : length + 1] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def copying_accuracy(language_model: torch.nn.Module, vocab_size: int, generator: torch.Generator,
                     batch_size: int = 64) -> float:
    """Greedy accuracy on the supervised (copyable) tokens of fresh copying sequences."""
    return greedy_accuracy(language_model, copying_batch(vocab_size, batch_size, generator))


def greedy_accuracy(language_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """How often the greedy next token is the label, over `batch`'s supervised tokens."""
    with torch.no_grad():
        predicted = language_model(input_ids=batch["input_ids"]).logits.argmax(-1)[:, :-1]
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    return (predicted[supervised] == targets[supervised]).float().mean().item()


__all__ = ["BATCH_SIZE", "SEQUENCE_LENGTH", "copying_accuracy", "copying_batch", "greedy_accuracy"]
