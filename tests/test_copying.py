"""The copying pretraining of a language model built from scratch (otter.data.copying,
`otter-train --copying-steps`)."""

import pytest
import torch
from tiny_models import TINY_OTTER_DIR

from otter import OtterModel, OtterProcessor
from otter.data.collate import IGNORE_INDEX
from otter.data.copying import copying_accuracy, copying_batch
from otter.defaults import copying_steps_for
from otter.training import pretrain_copying


def test_batch_repeats_each_sequence_and_supervises_only_what_copying_predicts():
    batch = copying_batch(50, 6, torch.Generator().manual_seed(0), length=10)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (6, 20) and ids.min() >= 3 and ids.max() < 50  # no BOS/EOS/UNK
    assert torch.equal(ids[:, :10], ids[:, 10:]) and len({tuple(row) for row in ids.tolist()}) == 6
    assert (labels[:, :11] == IGNORE_INDEX).all()  # the repeat's first token cannot be known before it is read
    assert torch.equal(labels[:, 11:], ids[:, 11:])


@pytest.mark.slow
def test_pretraining_teaches_the_language_model_to_copy_and_leaves_the_rest():
    processor = OtterProcessor.from_pretrained(TINY_OTTER_DIR)
    torch.manual_seed(0)
    model = OtterModel(OtterModel.config_class.from_pretrained(TINY_OTTER_DIR))
    perceiver = {k: v.clone() for k, v in model.perceiver.state_dict().items()}
    vocab = processor.tokenizer.vocab_size
    before = copying_accuracy(model.lang_encoder, vocab, torch.Generator().manual_seed(1))
    report = pretrain_copying(model, processor, 250, lr=1e-3, seed=0, show_progress=False)
    assert before < 0.05 and report["steps"] == 250 and report["accuracy"] > 0.9, (before, report)
    assert all(torch.equal(v, model.perceiver.state_dict()[k]) for k, v in perceiver.items())
    assert pretrain_copying(model, processor, 0, lr=1e-3, seed=0) is None


def test_only_a_model_built_from_scratch_for_the_in_context_task_pretrains_by_default():
    assert copying_steps_for("toy-mixture", from_scratch=True) == copying_steps_for("toy-icl", True) == 300
    # The VQA main job stays as measured.
    assert copying_steps_for("toy", True) == copying_steps_for("mixture.yaml", True) == 0
    assert copying_steps_for("toy-icl", from_scratch=False) == 0  # a pretrained LM can copy already


def test_the_experiment_repeats_each_sequence_after_a_gap_and_supervises_only_the_repeat():
    """scripts/experiment_copying.py's layout (the README's check that the pretraining teaches a shortcut)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from experiment_copying import gapped_batch

    batch = gapped_batch(40, 16, torch.Generator().manual_seed(0), lengths=(5, 5), max_gap=6, total=24)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (16, 24) and ids.min() >= 3 and ids.max() < 40
    distances = set()
    for row, row_labels in zip(ids, labels):
        supervised = (row_labels != IGNORE_INDEX).nonzero().flatten()
        assert len(supervised) == 4  # the repeat after its first token
        first = int(supervised[0]) - 1  # where the repeat starts
        copies = [s for s in range(first - 5 - 6, first - 4) if torch.equal(row[s : s + 5], row[first : first + 5])]
        assert copies, row  # the sequence occurs before the repeat, 0 to 6 tokens before it
        distances.add(first - copies[-1])
        assert torch.equal(row_labels[supervised], row[supervised])
    assert len(distances) > 2  # the repeat's distance varies from row to row
