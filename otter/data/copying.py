"""Text that teaches a language model built from scratch to copy: random token sequences, said again after a gap.

Otter's in-context learning rests on a skill its pretrained LLaMA brings: finding an earlier occurrence of what it is
reading and continuing as it continued (induction heads). The tiny Otter of the main job starts from random weights,
and on the in-context task alone it does not find that skill in the steps the main job has; pure copying gives it
first, as pretraining gave it to LLaMA (`otter-train --copying-steps`; the main job starts from that pretraining's
result, shipped in otter/assets/tiny-otter-copier by scripts/make_tiny_copier.py).

    tokens:  r r t1 t2 ... tL g g ... g t1 t2 ... tL r r     (L of 4-16 tokens, a gap of 0-16 random tokens g)
    labels:  -100 ...                  -100 t2 ... tL -100 -100   (the repeat, after its first token)

The gap and the length differ from row to row, so only matching the tokens' content finds what to copy: with the
repeat always right after the sequence, the model learns "copy the token 15 back" instead, a shortcut that does not
carry over to the in-context task (scripts/experiment_copying.py, README "In-context learning").
"""

from __future__ import annotations

import torch

from .collate import IGNORE_INDEX

SEQUENCE_LENGTHS = (4, 16)  # the copied sequence's shortest and longest
MAX_GAP = 16
ROW_LENGTH = 48  # room for the longest sequence twice and the longest gap
BATCH_SIZE = 32  # the pretraining's batch and learning rate, whatever `--batch-size` and `--lr` are
LEARNING_RATE = 1e-3


def copying_batch(vocab_size: int, batch_size: int, generator: torch.Generator, *,
                  lengths: tuple[int, int] = SEQUENCE_LENGTHS, max_gap: int = MAX_GAP,
                  row_length: int = ROW_LENGTH) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` (batch_size, row_length) of random ids in [3, vocab_size) (no BOS/EOS/UNK); in each
    row a sequence of a random length in `lengths`, a gap of 0..`max_gap` random tokens, then the sequence again.
    `vocab_size` should stop below the added special tokens."""
    if row_length < 2 * lengths[1] + max_gap:
        raise ValueError(f"row_length {row_length} is too short for two sequences of {lengths[1]} and a gap of "
                         f"{max_gap}")

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    input_ids = torch.randint(3, vocab_size, (batch_size, row_length), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(batch_size):
        length, gap = draw(*lengths), draw(0, max_gap)
        start = draw(0, row_length - 2 * length - gap)
        repeat = start + length + gap
        input_ids[row, repeat : repeat + length] = input_ids[row, start : start + length]
        # The repeat's first token cannot be known before it is read; the rest only copying predicts.
        labels[row, repeat + 1 : repeat + length] = input_ids[row, repeat + 1 : repeat + length]
    return {"input_ids": input_ids, "labels": labels}


def copying_accuracy(language_model: torch.nn.Module, vocab_size: int, generator: torch.Generator,
                     batch_size: int = 64) -> float:
    """Greedy accuracy on the supervised (copyable) tokens of fresh copying rows."""
    return greedy_accuracy(language_model, copying_batch(vocab_size, batch_size, generator))


def greedy_accuracy(language_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """How often the greedy next token is the label, over `batch`'s supervised tokens."""
    with torch.no_grad():
        predicted = language_model(input_ids=batch["input_ids"]).logits.argmax(-1)[:, :-1]
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    return (predicted[supervised] == targets[supervised]).float().mean().item()


__all__ = ["BATCH_SIZE", "LEARNING_RATE", "MAX_GAP", "ROW_LENGTH", "SEQUENCE_LENGTHS", "copying_accuracy", "copying_batch",
           "greedy_accuracy"]
