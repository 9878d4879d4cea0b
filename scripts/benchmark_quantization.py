#!/usr/bin/env python
"""Weight memory and logit error of a Flamingo model loaded in fp32, bf16, bnb int8, bnb nf4 and torchao int8.

A randomly initialised model with 9B proportions scaled down (LLaMA hidden 1024, 8 layers, cross-attention every
4 layers, ViT width 256 at 224 px, the real perceiver and cross-attention widths; the config of
benchmark_vs_reference.py) is saved in fp32, then loaded once per variant with `from_pretrained`, as a user would.
Quantized variants convert only the language model's decoder layers: the vision tower, perceiver, gated
cross-attention blocks and lm_head stay in `--unquantized-dtype`.

Columns: real weight storage (quantized data plus scales, not `get_memory_footprint()`, which counts torchao
weights at full size), its ratio to bf16, the decoder layers' share, then the max and mean absolute logit
difference from the fp32 model, that error as a multiple of plain bf16's, and top-1 agreement with fp32.
Random weights exaggerate quantization error (nf4 especially is tuned for trained weight distributions).

    python scripts/benchmark_quantization.py [--batch 2] [--text-tokens 64] [--threads 2]
"""

import argparse
import importlib.util
import logging
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BitsAndBytesConfig, TorchAoConfig
from transformers.utils import logging as hf_logging

from flamingo import FlamingoConfig, FlamingoModel

SCALED_9B = dict(
    vision_config=dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=224,
        patch_size=14, hidden_act="quick_gelu",
    ),
    text_config=dict(
        model_type="llama", hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32003,
    ),
    cross_attn_every_n_layers=4,
)
# Matched at module boundaries from the start, or as a regex from the start (transformers' skip-list rule), so each
# pattern also matches the parameter names torchao checks.
KEEP_UNQUANTIZED = ["vision_encoder", "perceiver", r".*\.gated_cross_attn_layer", r".*\.lm_head"]
# Variant -> the package it needs (None: transformers alone).
VARIANTS = {
    "fp32": None,
    "bf16": None,
    "bnb int8": "bitsandbytes",
    "bnb nf4": "bitsandbytes",
    "torchao int8 weight-only": "torchao",
}
MiB = 2**20


def load_kwargs(variant: str, unquantized_dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments of a variant; quantized ones load on the CPU, the rest in `unquantized_dtype`."""
    if variant in ("fp32", "bf16"):
        return dict(dtype=torch.float32 if variant == "fp32" else torch.bfloat16)
    if variant == "bnb int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_UNQUANTIZED)
    elif variant == "bnb nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=unquantized_dtype,
            llm_int8_skip_modules=KEEP_UNQUANTIZED,
        )
    else:
        from torchao.quantization import Int8WeightOnlyConfig  # imported here: torchao is optional

        config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=KEEP_UNQUANTIZED)
    return dict(quantization_config=config, dtype=unquantized_dtype, device_map="cpu")


@dataclass
class Measurement:
    weight_bytes: int
    decoder_layer_bytes: int
    max_error: float  # max |logit - fp32 logit|
    mean_error: float
    top1_agreement: float  # share of positions whose argmax equals fp32's


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight really occupies: a torchao tensor subclass by its inner tensors, a bnb parameter by its
    packed data plus the scales it carries."""
    if hasattr(tensor, "__tensor_flatten__"):  # torchao Int8Tensor: qdata, scale (zero_point may be None)
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, name)) for name in inner_names if getattr(tensor, name) is not None)
    size = tensor.numel() * tensor.element_size()
    if getattr(tensor, "SCB", None) is not None:  # bnb int8: one fp32 scale per output row
        size += storage_bytes(tensor.SCB)
    if getattr(tensor, "quant_state", None) is not None:  # bnb 4-bit: per-block scales
        size += quant_state_bytes(tensor.quant_state)
    return size


def quant_state_bytes(state) -> int:
    """A bnb 4-bit `QuantState`: its tensors (absmax, code, offset) and, with double quantization, `state2`."""
    size = sum(storage_bytes(value) for value in vars(state).values() if isinstance(value, torch.Tensor))
    return size + (quant_state_bytes(state.state2) if getattr(state, "state2", None) is not None else 0)


def weight_bytes(module: nn.Module) -> int:
    return sum(storage_bytes(tensor) for tensor in [*module.parameters(), *module.buffers()])


def decoder_layer_bytes(model: FlamingoModel) -> int:
    """The quantized part: the language model's own decoder layers, without the cross-attention blocks."""
    return sum(weight_bytes(layer.decoder_layer) for layer in model.decoder_layers)


def build_inputs(config: FlamingoConfig, batch: int, text_tokens: int, seed: int) -> dict:
    """One image per row, its `<image>` token second, random text around it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.endofchunk_token_id, (batch, text_tokens), generator=generator)
    input_ids[:, 1] = config.media_token_id
    size = config.vision_config.image_size
    return dict(input_ids=input_ids, vision_x=torch.randn(batch, 1, 1, 3, size, size, generator=generator))


def open_gates(model: FlamingoModel) -> None:
    """Fresh gates are 0 (images ignored); open them so the unquantized parts shape the logits, as when trained."""
    with torch.no_grad():
        for layer in model.decoder_layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(1.0)
                layer.gated_cross_attn_layer.ff_gate.fill_(1.0)


def print_table(results: dict[str, Measurement | None]) -> None:
    """One row per variant; ratios are to bf16, the usual unquantized deployment."""
    bf16 = results["bf16"]
    columns = [("variant", 26), ("weights MiB", 12), ("x bf16", 8), ("decoder MiB", 13), ("max |dlogit|", 14),
               ("mean |dlogit|", 15), ("x bf16 err", 12), ("top-1 agree", 13)]
    header = "".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    print(header)
    print("-" * len(header))
    for variant, m in results.items():
        if m is None:
            print(f"{variant:<26}skipped: {VARIANTS[variant]} is not installed")
            continue
        print(f"{variant:<26}{m.weight_bytes / MiB:>12.1f}{m.weight_bytes / bf16.weight_bytes:>8.2f}"
              f"{m.decoder_layer_bytes / MiB:>13.1f}{m.max_error:>14.4f}{m.mean_error:>15.5f}"
              f"{m.mean_error / bf16.mean_error:>12.2f}{m.top1_agreement:>13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="rows of the input batch")
    parser.add_argument("--text-tokens", type=int, default=64, help="tokens per row, one of them <image>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--unquantized-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of what the quantized variants do not quantize (default: bfloat16, as deployed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every int8 call
    unquantized_dtype = getattr(torch, args.unquantized_dtype)

    config = FlamingoConfig(**SCALED_9B)
    torch.manual_seed(args.seed)
    model = FlamingoModel(config).eval()
    open_gates(model)
    inputs = build_inputs(config, args.batch, args.text_tokens, args.seed)
    results: dict[str, Measurement | None] = {}
    with tempfile.TemporaryDirectory() as checkpoint, torch.inference_mode():
        model.save_pretrained(checkpoint)
        reference = model(**inputs).logits.float()
        for variant, package in VARIANTS.items():
            if package is not None and importlib.util.find_spec(package) is None:
                results[variant] = None
                continue
            loaded = FlamingoModel.from_pretrained(checkpoint, **load_kwargs(variant, unquantized_dtype)).eval()
            logits = loaded(**inputs).logits.float()
            error = (logits - reference).abs()
            agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            results[variant] = Measurement(
                weight_bytes(loaded), decoder_layer_bytes(loaded), error.max().item(), error.mean().item(), agreement
            )

    print(f"scaled 9B config: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, batch {args.batch} x "
          f"{args.text_tokens} tokens + 1 image of {config.vision_config.image_size} px, threads {args.threads}, "
          f"quantized variants keep the rest in {args.unquantized_dtype}; errors vs the fp32 model")
    print_table(results)


if __name__ == "__main__":
    main()
