"""The copying pretraining of a language model built from scratch (otter.data.copying,
`otter-train --copying-steps`)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_OTTER_DIR

from otter import OtterModel, OtterProcessor
from otter.data.collate import IGNORE_INDEX
from otter.data.copying import copying_accuracy, copying_batch, greedy_accuracy
from otter.defaults import COPYING_STEPS, SHIPPED_COPIER, starts_from_copier
from otter.training import load_copier, pretrain_copying

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_each_row_repeats_a_sequence_after_a_gap_and_supervises_only_the_repeat():
    batch = copying_batch(40, 16, torch.Generator().manual_seed(0), lengths=(5, 5), max_gap=6, row_length=24)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (16, 24) and ids.min() >= 3 and ids.max() < 40  # no BOS/EOS/UNK
    distances = set()
    for row, row_labels in zip(ids, labels):
        supervised = (row_labels != IGNORE_INDEX).nonzero().flatten()
        assert len(supervised) == 4  # the repeat after its first token, which cannot be known before it is read
        first = int(supervised[0]) - 1  # where the repeat starts
        copies = [s for s in range(first - 5 - 6, first - 4) if torch.equal(row[s : s + 5], row[first : first + 5])]
        assert copies, row  # the sequence occurs before the repeat, 0 to 6 tokens before it
        distances.add(first - copies[-1])
        assert torch.equal(row_labels[supervised], row[supervised])
    assert len(distances) > 2  # the repeat's distance varies from row to row: only the content says what to copy


def test_a_row_too_short_for_the_layout_is_refused():
    with pytest.raises(ValueError, match="row_length 20 is too short for two sequences of 8 and a gap of 6"):
        copying_batch(40, 2, torch.Generator(), lengths=(4, 8), max_gap=6, row_length=20)


def test_the_first_layout_repeats_right_after_the_sequence():
    """scripts/experiment_copying.py --layout fixed: the pretraining that taught a shortcut (README)."""
    from experiment_copying import fixed_batch

    batch = fixed_batch(50, 6, torch.Generator().manual_seed(0), length=10)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (6, 20) and ids.min() >= 3 and ids.max() < 50
    assert torch.equal(ids[:, :10], ids[:, 10:]) and len({tuple(row) for row in ids.tolist()}) == 6
    assert (labels[:, :11] == IGNORE_INDEX).all() and torch.equal(labels[:, 11:], ids[:, 11:])


@pytest.mark.slow
def test_pretraining_teaches_the_language_model_to_copy_by_content_and_leaves_the_rest():
    # The shipped layout over the whole vocabulary forms copying between steps 750 and 1250 (README); a small layout
    # (37 token ids, sequences of 3-6 after gaps of 0-4) goes through the same sudden change by step ~350.
    small_layout = functools.partial(copying_batch, 40, lengths=(3, 6), max_gap=4, row_length=16)
    processor = OtterProcessor.from_pretrained(TINY_OTTER_DIR)
    torch.manual_seed(0)
    model = OtterModel(OtterModel.config_class.from_pretrained(TINY_OTTER_DIR))
    perceiver = {k: v.clone() for k, v in model.perceiver.state_dict().items()}

    def accuracy() -> float:
        return greedy_accuracy(model.lang_encoder, small_layout(64, torch.Generator().manual_seed(9)))

    before = accuracy()
    report = pretrain_copying(model, processor, 450, lr=1e-3, seed=0, show_progress=False,
                              make_batch=lambda vocab_size, batch_size, generator: small_layout(batch_size, generator))
    after = accuracy()
    assert before < 0.1 and after > 0.7 and report["steps"] == 450, (before, after, report)
    assert all(torch.equal(v, model.perceiver.state_dict()[k]) for k, v in perceiver.items())
    assert pretrain_copying(model, processor, 0, lr=1e-3, seed=0) is None


def test_only_a_model_built_from_scratch_for_the_in_context_task_starts_from_the_copier():
    assert starts_from_copier("toy-mixture", from_scratch=True, copying_steps=None)
    assert starts_from_copier("toy-icl", True, None)
    # The VQA main job stays as measured; an explicit --copying-steps pretrains instead (0: not at all).
    assert not starts_from_copier("toy", True, None) and not starts_from_copier("mixture.yaml", True, None)
    assert not starts_from_copier("toy-mixture", True, 0) and not starts_from_copier("toy-mixture", True, 300)
    assert not starts_from_copier("toy-icl", from_scratch=False, copying_steps=None)  # a pretrained LM copies already


def test_the_shipped_copier_copies_and_is_what_its_record_says():
    """otter/assets/tiny-otter-copier (scripts/make_tiny_copier.py): the main job's language model before Otter
    trains. Its accuracy on fresh rows of the shipped layout is re-measured here, not read from the record."""
    record = json.loads((SHIPPED_COPIER / "record.json").read_text())
    assert record["steps"] == COPYING_STEPS and record["model"] == "tiny-otter"
    model = OtterModel(OtterModel.config_class.from_pretrained(TINY_OTTER_DIR))
    vocab_size = OtterProcessor.from_pretrained(TINY_OTTER_DIR).tokenizer.vocab_size
    before = copying_accuracy(model.lang_encoder, vocab_size, torch.Generator().manual_seed(5))
    cross_attention = {k: v.clone() for k, v in model.lang_encoder.state_dict().items() if "gated_cross_attn" in k}
    report = load_copier(model, SHIPPED_COPIER)
    after = copying_accuracy(model.lang_encoder, vocab_size, torch.Generator().manual_seed(5))
    assert before < 0.05 and after > 0.8, (before, after)
    assert abs(after - record["accuracy"]) < 0.05 and report["from"] == str(SHIPPED_COPIER)
    assert all(torch.equal(v, model.lang_encoder.state_dict()[k]) for k, v in cross_attention.items())


def test_a_copier_that_does_not_fit_the_model_is_refused_with_what_to_do(tmp_path):
    config = OtterModel.config_class.from_pretrained(TINY_OTTER_DIR)
    config.text_config.hidden_size, config.text_config.head_dim = 32, 8
    with pytest.raises(ValueError, match=r"does not fit this model \(the language model weight \S+ has shape \(595, 64\); this config's language model needs \(595, 32\)\); pass --copying-steps N"):
        load_copier(OtterModel(config), SHIPPED_COPIER)


def test_the_main_job_starts_from_the_shipped_copier_without_pretraining(tmp_path):
    command = [sys.executable, "-m", "otter.train", "--data", "toy-icl", "--max-steps", "1", "--batch-size", "2",
               "--eval-samples", "0", "--eval-every", "0", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "copying:" not in result.stderr  # no pretraining progress bar
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["copying"] == {**json.loads((SHIPPED_COPIER / "record.json").read_text()), "from": str(SHIPPED_COPIER)}
