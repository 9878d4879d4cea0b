"""The memory planner: parameter counts of the 9B configs, the activation model against saved-tensor measurements,
the CLI, and fits/does-not-fit decisions."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from flamingo.arguments import parse_gpus
from flamingo.commands.memory import main
from flamingo.loading import load_config
from flamingo.memory import (
    GiB,
    activation_bytes,
    count_parameters,
    measure_saved_bytes,
    plan_memory,
)
from flamingo.planning import meta_model

ROOT = Path(__file__).resolve().parent.parent


def test_otter_llama_parameter_counts_match_the_published_totals():
    """otter.md §3.4: 8,220,463,120 parameters, 1,441,011,728 trainable (perceiver + cross-attention + full
    embed_tokens and lm_head rows, vocab 32004) -- the "Total Trainable param: 1.441012 B" of issue #256."""
    counts = count_parameters(meta_model(load_config("otter-9b-llama")), "otter")
    assert counts.total_sum == 8_220_463_120
    assert counts.trainable_sum == 1_441_011_728
    assert counts.total["vision_encoder"] == 303_179_776
    assert counts.total["perceiver"] == 63_019_008
    assert counts.total["cross_attention"] == 8 * 139_476_994
    assert counts.trainable["lm_decoder"] == counts.trainable["vision_encoder"] == 0


def test_trainable_sets_all_and_lora():
    model = meta_model(load_config("otter-9b-llama"))
    everything = count_parameters(model, "all")
    # all: everything but CLIP's post_layernorm (2 x 1024), which only pools the CLS token the features omit
    assert everything.trainable_sum == everything.total_sum - 2048
    lora = count_parameters(model, "lora")
    assert lora.lora == 32 * 2 * 16 * (4096 + 4096)  # r=16 on q_proj and v_proj of 32 layers
    assert lora.trainable_sum == 1_441_011_728 + lora.lora


def test_openflamingo_mpt_counts_are_consistent():
    counts = count_parameters(meta_model(load_config("openflamingo-9b-mpt7b")), "otter")
    assert 8.0e9 < counts.total_sum < 8.5e9
    assert counts.trainable["lm_decoder"] == 0 and counts.trainable["cross_attention"] > 0


def small_config(hidden=256, intermediate=688, layers=4, vision_width=128):
    config = copy.deepcopy(load_config("tiny-otter"))
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, intermediate, layers
    text.num_attention_heads = text.num_key_value_heads = hidden // 64
    text.head_dim = 64
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = vision_width, 4 * vision_width, 2
    vision.image_size, vision.patch_size, vision.num_attention_heads = 64, 8, vision_width // 32
    config.perceiver_num_latents, config.perceiver_depth = 16, 2
    return config


SETTINGS = [  # trainable, batch, seq, images, checkpointing
    ("all", 1, 64, 1, False),
    ("all", 2, 64, 2, False),
    ("otter", 1, 128, 1, False),
    ("otter", 2, 64, 2, False),
    ("all", 1, 64, 1, True),
    ("otter", 2, 128, 2, True),
]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    config = small_config()
    return config, AutoModel.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("trainable,batch,seq,images,checkpointing", SETTINGS)
def test_activation_model_within_15_percent_of_saved_tensors(small_model, trainable, batch, seq, images, checkpointing):
    config, model = small_model
    model.set_trainable(language_model=trainable == "all", vision_encoder=trainable == "all")
    measured = measure_saved_bytes(model, batch, seq, images, checkpointing)
    predicted = activation_bytes(config, batch, seq, images, torch.float32, trainable, checkpointing).total
    assert measured > 0
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_activation_model_tracks_a_wider_model():
    torch.manual_seed(0)
    config = small_config(hidden=512, intermediate=1376)
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.set_trainable()
    measured = measure_saved_bytes(model, 1, 96, 1)
    predicted = activation_bytes(config, 1, 96, 1, torch.float32, "otter").total
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_checkpointing_saves_memory():
    config = load_config("otter-9b-llama")
    full = activation_bytes(config, 4, 512, 1, torch.bfloat16, "otter").total
    checkpointed = activation_bytes(config, 4, 512, 1, torch.bfloat16, "otter", checkpointing=True).total
    assert checkpointed < full / 4


def test_parse_gpus():
    assert parse_gpus("4x24GB") == (4, 24 * GiB)
    assert parse_gpus("80GB") == (1, 80 * GiB)
    with pytest.raises(ValueError):
        parse_gpus("lots")


def test_clear_fit_decisions():
    config = load_config("otter-9b-llama")
    # inference in bf16 (15.3 GiB of weights) on one 80 GiB GPU fits; on one 16 GiB GPU it does not
    assert plan_memory(config, "1x80GB", "inference", "bf16", strategy="single").fits
    assert not plan_memory(config, "1x16GB", "inference", "bf16", strategy="single").fits
    # full fine-tuning with AdamW (16 bytes per parameter, 131 GB) cannot fit one 80 GiB GPU, but ZeRO-3 over 8 can
    assert not plan_memory(config, "1x80GB", "training", "bf16", batch=1, trainable="all").fits
    sharded = plan_memory(config, "8x80GB", "training", "bf16", batch=1, trainable="all", strategy="zero3",
                          checkpointing=True)
    assert sharded.fits
    # int8 weights shrink the decoder layers
    assert plan_memory(config, "1x24GB", "inference", "bf16", int8=True).gpus[0].weights < 10 * GiB


def test_strategies_divide_as_documented():
    config = load_config("otter-9b-llama")
    common = dict(gpus="4x80GB", mode="training", dtype="bf16", batch=1, seq=256)
    ddp = plan_memory(config, strategy="ddp", **common).gpus[0]
    zero2 = plan_memory(config, strategy="zero2", **common).gpus[0]
    zero3 = plan_memory(config, strategy="zero3", **common).gpus[0]
    assert zero2.weights == ddp.weights and zero2.optimizer * 4 == ddp.optimizer
    assert zero3.weights < ddp.weights / 2 and zero3.optimizer == zero2.optimizer
    # mixed precision: AdamW's two fp32 states and an fp32 master copy, 12 bytes per trainable parameter
    assert ddp.optimizer == 12 * 1_441_011_728
    mapped = plan_memory(config, strategy="device_map", **{**common, "gpus": "2x24GB"})
    assert len(mapped.gpus) == 2 and all(gpu.weights > 5 * GiB for gpu in mapped.gpus)
    assert sum(gpu.weights for gpu in mapped.gpus) == ddp.weights


def run_cli(*args):
    command = [sys.executable, "-m", "flamingo.commands.memory", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--strategy" in help_text and "--gradient-checkpointing" in help_text and "flamingo-memory" in help_text


def test_cli_exit_status_says_whether_it_fits(capsys):
    assert main(["otter-9b-llama", "--gpus", "1x16GB", "--mode", "inference"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_table_in_a_subprocess():
    result = run_cli("otter-9b-llama", "--gpus", "2x24GB", "--mode", "inference", "--strategy", "device_map")
    assert result.returncode == 0, result.stderr
    assert "FITS" in result.stdout and "8,220,463,120" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2
