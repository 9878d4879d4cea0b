"""Big models on small machines, checked without a GPU.

1. Multi-GPU placement of the real 9B configs, planned on the meta device with the planner `from_pretrained(
   device_map="auto")` uses and with accelerate's, and checked by `flamingo.planning.check_device_map`.
2. Disk offload of a tiny model on the CPU: exactly the logits and tokens of the fully loaded model.
3. 8-bit loading on the CPU: only the language model's decoder layers are quantized; mixed precision.
"""

import functools
import importlib.util
import math

import pytest
import torch
from tiny_models import TINY_TEXT, TINY_VISION, VOCAB, batch, randomize_gates, tiny_config, tiny_model
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel, TorchAoConfig

import otter  # noqa: F401  (registers OtterModel with AutoModel for meta_model)
from flamingo import FlamingoModel
from flamingo.loading import load_config
from flamingo.planning import (
    check_device_map,
    explicit_device_map,
    meta_model,
    parse_max_memory,
    plan_device_map,
    resolve_device,
)

NINE_B = ["openflamingo-9b-llama", "otter-9b-llama", "openflamingo-9b-mpt7b", "otter-9b-mpt7b"]
# 22 GiB of a 24 GiB card (RTX 3090/4090, A10/L4 class) leaves 2 GiB for the CUDA context (~0.5 GiB), activations
# and the KV cache (LLaMA-7B, bf16: 0.5 MiB per token, 1 GiB for one 2048-token sequence, spread over the GPUs).
# 10 GiB is the same headroom on a 12 GiB card, where the 15.3 GiB of bf16 weights must be split.
GPU_SETS = {"2x24GB": (2, "22GiB"), "4x24GB": (4, "22GiB"), "2x12GB": (2, "10GiB")}
PLANNERS = {
    "transformers-auto": ("transformers", "auto"),  # from_pretrained(device_map="auto", max_memory=...)
    "accelerate-sequential": ("accelerate", "sequential"),  # infer_auto_device_map(model, max_memory=...)
    "accelerate-auto": ("accelerate", "auto"),  # load_checkpoint_and_dispatch(device_map="auto")
}


@functools.cache
def nine_b(name: str) -> PreTrainedModel:
    """A 9B model in bf16 on the meta device (~0.2 s, no memory). Shared: tests must not modify it."""
    return meta_model(load_config(name))


def gpu_budget(count: int, per_gpu: str) -> dict:
    return {**{gpu: per_gpu for gpu in range(count)}, "cpu": "64GiB"}


# ---- 1. planning the 9B models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NINE_B)
def test_meta_build_is_the_9b_model_without_memory(name):
    model = nine_b(name)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert 8.0e9 < sum(p.numel() for p in model.parameters()) < 8.3e9  # "9B" = LLaMA/MPT-7B + ViT-L + 1.1B new
    assert {"FlamingoLayer", "PerceiverBlock"} <= set(model._no_split_modules)


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize("gpus", sorted(GPU_SETS))
@pytest.mark.parametrize("name", NINE_B)
def test_9b_plan_keeps_every_block_whole_and_within_budget(name, gpus, planner):
    model = nine_b(name)
    count, per_gpu = GPU_SETS[gpus]
    budget = gpu_budget(count, per_gpu)
    device_map = plan_device_map(model, budget, *PLANNERS[planner])
    report = check_device_map(model, device_map, budget)

    assert report.problems == []
    assert set(report.bytes_per_device) <= set(range(count))  # nothing offloaded to the CPU or disk
    layers = report.decoder_layers_per_device
    assert sorted(i for indices in layers.values() for i in indices) == list(range(32))
    assert all("," not in span for span in report.decoder_layer_ranges().values())  # each GPU visited once
    if PLANNERS[planner][1] == "sequential":  # fills GPU 0 first: as few GPUs as the budget allows
        total = sum(report.bytes_per_device.values())
        assert len(layers) == math.ceil(total / parse_max_memory({0: per_gpu})[0])
    else:  # balanced: every GPU gets decoder layers
        assert sorted(layers) == list(range(count))


def test_from_pretrained_plan_for_openflamingo_9b_on_two_24gb_gpus():
    """The documented plan: what `from_pretrained(device_map="auto", max_memory={0: "22GiB", 1: "22GiB"})` does."""
    model = nine_b("openflamingo-9b-llama")
    budget = gpu_budget(2, "22GiB")
    device_map = plan_device_map(model, budget)
    report = check_device_map(model, device_map, budget).raise_for_problems()
    assert report.summary() == "0: 7.36 GiB, layers 0-14; 1: 7.95 GiB, layers 15-31"
    assert {device_map[name] for name in ("vision_encoder", "perceiver", "lang_encoder.model.embed_tokens")} == {0}
    assert device_map["lang_encoder.lm_head"] == 1


def test_without_flamingo_layer_in_no_split_modules_a_block_leaves_its_decoder_layer():
    """Why `FlamingoLayer` is in `_no_split_modules`: with only the LM's decoder layer unsplittable, the balanced
    planner cuts between a cross-attention block and its decoder layer (layer 15 of 32 on 2 GPUs)."""
    model = meta_model(load_config("openflamingo-9b-llama"))
    model._no_split_modules = set(model._no_split_modules) - {"FlamingoLayer"}
    budget = gpu_budget(2, "22GiB")
    report = check_device_map(model, plan_device_map(model, budget), budget)
    assert any("its gated cross-attention block and decoder layer span" in problem for problem in report.problems)


# ---- the checker itself ------------------------------------------------------------------------------------------
def layers_name(model: FlamingoModel) -> str:
    """The decoder layers' module list, as device maps name it: "lang_encoder.model.layers" for LLaMA."""
    return f"lang_encoder.{model.decoder_layers_path}"


def test_check_finds_a_block_away_from_its_decoder_layer():
    model = nine_b("openflamingo-9b-llama")
    device_map = explicit_device_map(model, {f"{layers_name(model)}.3.gated_cross_attn_layer": 1}, default=0)
    report = check_device_map(model, device_map)
    assert any("(FlamingoLayer, must not be split) spans ['0', '1']" in p for p in report.problems)
    assert any(p.startswith("decoder layer 3 ") for p in report.problems)
    with pytest.raises(ValueError, match="bad device map:\n  lang_encoder.model.layers.3 "):
        report.raise_for_problems()


def test_check_finds_unplaced_tensors_budget_overruns_and_tied_weights_apart():
    llama = nine_b("openflamingo-9b-llama")
    device_map = {"vision_encoder": 0, "perceiver": 0, "lang_encoder.model": 0}  # no lm_head
    problems = check_device_map(llama, device_map, {0: "10GiB"}).problems
    assert "lang_encoder.lm_head.weight is on no device (no prefix of it in the map)" in problems
    assert any(p.startswith("device 0 holds 15.") and p.endswith("over its budget of 10.00 GiB") for p in problems)

    mpt = nine_b("openflamingo-9b-mpt7b")  # lm_head is tied to the input embeddings
    device_map = explicit_device_map(mpt, {"lang_encoder.lm_head": 1}, default=0)
    assert check_device_map(mpt, device_map).problems == [
        "tied lang_encoder.lm_head.weight (1) and lang_encoder.transformer.wte.weight (0) are on different devices"
    ]


def test_resolve_device_matches_whole_module_names_longest_first():
    device_map = {"": "cpu", "model.layers": 0, "model.layers.1": 1}
    assert resolve_device(device_map, "model.layers.1.weight") == 1
    assert resolve_device(device_map, "model.layers.11.weight") == 0  # "layers.1" is not a prefix of "layers.11"
    assert resolve_device(device_map, "lm_head.weight") == "cpu"
    assert resolve_device({"model": 0}, "lm_head.weight") is None


def test_explicit_device_map_rejects_unknown_modules():
    with pytest.raises(AttributeError, match="perceivr"):
        explicit_device_map(nine_b("openflamingo-9b-llama"), {"perceivr": "disk"}, default="cpu")


# ---- 2. disk offload on the CPU ----------------------------------------------------------------------------------
def logits_and_tokens(model: FlamingoModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the test batch, and 6 greedy tokens after it (fewer if every row ends its chunk)."""
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        tokens = model.generate(
            input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask, max_new_tokens=6, do_sample=False
        )
    return logits, tokens


@pytest.fixture(scope="module", params=["llama", "mpt"])
def saved_tiny(request, tmp_path_factory):
    """A tiny model saved to disk, with its logits and greedy tokens when fully loaded."""
    model = tiny_model(request.param)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    return model, path, logits_and_tokens(model)


def test_explicit_map_with_cross_attention_layers_and_perceiver_on_disk_is_exact(saved_tiny, tmp_path):
    model, path, (logits, tokens) = saved_tiny
    layers = layers_name(model)
    assert model.decoder_layers[1].gated_cross_attn_layer is not None
    on_disk = {"perceiver": "disk", f"{layers}.1": "disk", f"{layers}.2": "disk"}
    device_map = explicit_device_map(model, on_disk, default="cpu")

    offloaded = FlamingoModel.from_pretrained(path, device_map=device_map, offload_folder=tmp_path)

    assert offloaded.hf_device_map == device_map
    assert offloaded.perceiver.latents.device.type == "meta"  # really on disk, loaded per forward
    assert offloaded.decoder_layers[1].gated_cross_attn_layer.attn.to_q.weight.device.type == "meta"
    offloaded_logits, offloaded_tokens = logits_and_tokens(offloaded)
    assert torch.equal(offloaded_logits, logits)
    assert torch.equal(offloaded_tokens, tokens)


def test_auto_map_with_a_small_cpu_budget_splits_between_layers_and_is_exact(saved_tiny):
    model, path, (logits, tokens) = saved_tiny
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    offloaded = FlamingoModel.from_pretrained(path, device_map="auto", max_memory={"cpu": int(0.85 * model_bytes)})

    report = check_device_map(offloaded, offloaded.hf_device_map)
    assert report.problems == []  # in particular, no FlamingoLayer split between cpu and disk
    assert set(report.decoder_layers_per_device) == {"cpu", "disk"}  # the cut falls inside the decoder stack
    offloaded_logits, offloaded_tokens = logits_and_tokens(offloaded)
    assert torch.equal(offloaded_logits, logits)
    assert torch.equal(offloaded_tokens, tokens)


# ---- 3. quantized and mixed-precision loading on the CPU ---------------------------------------------------------
def requires(package: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"{package} is not installed (pip install {package}; it runs on CPU)")


# Matched from the start at a module boundary or as a regex from the start, so they match torchao's parameter
# names too; a custom list replaces transformers' default, which keeps only lm_head.
KEEP_UNQUANTIZED = ["vision_encoder", "perceiver", r".*\.gated_cross_attn_layer", r".*\.lm_head"]
# Measured over 5 seeds on this model (logits std ~0.32): max |logit error| 0.019-0.028 for bnb int8, 0.013-0.018 for
# torchao int8, 0.0011-0.0014 for fp16.
MAX_LOGIT_ERROR = 0.05


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    """A small model whose linear layers are wide enough for the bnb CPU kernels (hidden 256), saved in fp32."""
    config = tiny_config(
        vision_config={**TINY_VISION, "hidden_size": 256, "intermediate_size": 512},
        text_config={**TINY_TEXT["llama"], "hidden_size": 256, "intermediate_size": 512, "vocab_size": VOCAB},
        perceiver_heads=4, perceiver_dim_head=64, cross_attn_heads=4, cross_attn_dim_head=64,
    )
    torch.manual_seed(0)
    model = randomize_gates(FlamingoModel(config).eval())
    path = tmp_path_factory.mktemp("small")
    model.save_pretrained(path)
    return model, path, logits_and_tokens(model)[0]


def linear_kinds(model: FlamingoModel) -> dict[str, set[str]]:
    """Class name of each linear layer's module and weight, per part of the model."""
    parts = {"vision": model.vision_encoder, "perceiver": model.perceiver, "lm_head": model.get_output_embeddings()}
    layers = model.decoder_layers
    blocks = [layer.gated_cross_attn_layer for layer in layers if layer.gated_cross_attn_layer is not None]
    parts["cross-attention"] = nn.ModuleList(blocks)
    parts["decoder"] = nn.ModuleList(layer.decoder_layer for layer in layers)
    return {
        part: {f"{type(m).__name__}/{type(m.weight).__name__}" for m in module.modules() if isinstance(m, nn.Linear)}
        for part, module in parts.items()
    }


def assert_only_decoder_layers_quantized(model: FlamingoModel, quantized_kind: str) -> None:
    kinds = linear_kinds(model)
    assert kinds.pop("decoder") == {quantized_kind}
    assert kinds == {part: {"Linear/Parameter"} for part in kinds}
    assert model.get_output_embeddings().weight.dtype == torch.float32


def assert_close_to_fp32_and_generates(model: FlamingoModel, reference_logits: torch.Tensor) -> None:
    logits, tokens = logits_and_tokens(model)
    error = (logits - reference_logits).abs().max().item()
    assert 0 < error < MAX_LOGIT_ERROR  # quantized (not bit-identical), but close
    prompt = batch()[0]
    assert tokens.shape[1] > prompt.shape[1] and torch.equal(tokens[:, : prompt.shape[1]], prompt)


@requires("bitsandbytes")
def test_load_in_8bit_with_skip_list_quantizes_only_decoder_layers(saved_small):
    _, path, reference_logits = saved_small
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_UNQUANTIZED)
    model = FlamingoModel.from_pretrained(path, quantization_config=config, device_map="cpu")
    assert_only_decoder_layers_quantized(model, "Linear8bitLt/Int8Params")
    assert_close_to_fp32_and_generates(model, reference_logits)


@requires("torchao")
def test_torchao_int8_weight_only_with_skip_list_quantizes_only_decoder_layers(saved_small):
    from torchao.quantization import Int8WeightOnlyConfig  # here: torchao is optional

    _, path, reference_logits = saved_small
    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=KEEP_UNQUANTIZED)
    model = FlamingoModel.from_pretrained(path, quantization_config=config, device_map="cpu")
    assert_only_decoder_layers_quantized(model, "Linear/Int8Tensor")
    assert_close_to_fp32_and_generates(model, reference_logits)


@requires("bitsandbytes")
def test_load_in_8bit_alone_quantizes_only_decoder_layers(saved_small):
    _, path, _ = saved_small
    config = BitsAndBytesConfig(load_in_8bit=True)
    model = FlamingoModel.from_pretrained(path, quantization_config=config, device_map="cpu")
    assert_only_decoder_layers_quantized(model, "Linear8bitLt/Int8Params")


def test_float16_load_runs_and_stays_close(saved_small):
    """Guards the default skip list: once the model declares `_keep_in_fp32_modules`, loading in fp16 keeps those
    modules in fp32, and the forward must then mix dtypes."""
    _, path, reference_logits = saved_small
    model = FlamingoModel.from_pretrained(path, dtype=torch.float16)
    logits, _ = logits_and_tokens(model)
    assert logits.dtype == torch.float16
    assert (logits.float() - reference_logits).abs().max() < 0.01


def test_trainable_parts_in_fp32_with_a_bf16_language_model():
    """Otter's recipe (train perceiver + cross-attention, freeze the LM) with the frozen LM in bf16."""
    model = tiny_model().to(torch.bfloat16)
    model.perceiver.float()
    for layer in model.decoder_layers:
        if layer.gated_cross_attn_layer is not None:
            layer.gated_cross_attn_layer.float()
    logits, _ = logits_and_tokens(model)
    assert logits.dtype == torch.bfloat16
