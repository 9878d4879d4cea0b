"""Training recipes of Flamingo-style models, in one place: what trains, where LoRA goes, what decays, what stays in
fp32. `otter-train`, the memory planner (`flamingo-memory --trainable`) and the model read them from here.

Trainable sets (`--trainable`):
- `otter`: Otter's and OpenFlamingo's recipe: the perceiver and the gated cross-attention blocks train; the vision
  encoder and the language model are frozen, except the embedding rows of the added tokens.
- `all`: everything (what a model trained from scratch needs).
- `lora`: `otter` plus rank-16 LoRA adapters on the language model's attention projections.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import nn

TRAINABLE_SETS = ("otter", "all", "lora")
# Modules kept in fp32 when the model loads in fp16 (bf16 loads are unaffected): the parts that train.
FP32_MODULES = ["vision_encoder", "perceiver", r".*\.gated_cross_attn_layer"]
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
# q and v projections of every decoder layer (GPT-NeoX: its fused query_key_value; MPT: its fused Wqkv).
LORA_TARGETS = r".*\.decoder_layer\..*\.(q_proj|v_proj|query_key_value|Wqkv)$"
# Weight decay applies to the cross-attention matrices only (Otter): never to gates, norms, biases, the feed-forward's
# LayerNorm, or the embeddings, whose frozen rows would otherwise decay.
NO_DECAY = ("attn_gate", "ff_gate", "norm", "bias", "feed_forward.0")  # not "gate": gated_cross_attn_layer has it


def check_trainable(trainable: str) -> str:
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE_SETS)}, got {trainable!r}")
    return trainable


def freeze_for(model: nn.Module, trainable: str, *, train_vision_encoder: bool = False) -> None:
    """`requires_grad` as the set says (LoRA adapters, once added by `add_lora`, are switched on by it)."""
    everything = check_trainable(trainable) == "all"
    model.set_trainable(language_model=everything, vision_encoder=everything or train_vision_encoder)


def add_lora(model: nn.Module) -> None:
    """Inject LoRA adapters into the language model (before `freeze_for`: peft freezes what it wraps) and make them
    trainable after it."""
    # Not an import statement: this module goes into every saved checkpoint folder (the model imports it), and
    # transformers asks whoever loads a folder's code to install each module its import statements name.
    peft = importlib.import_module("peft")  # pip install "flamingo-otter-hf[train]"

    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS)
    peft.inject_adapter_in_model(config, model.lang_encoder)


def enable_lora(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)


def apply(model: nn.Module, trainable: str, *, train_vision_encoder: bool = False) -> None:
    """Set up `model` to train the set `trainable`."""
    if check_trainable(trainable) == "lora":
        add_lora(model)
    freeze_for(model, trainable, train_vision_encoder=train_vision_encoder)
    enable_lora(model)


def lora_parameter_count(model: nn.Module) -> int:
    """Parameters `add_lora` would add, computed without peft (works on the meta device)."""
    pattern = re.compile(LORA_TARGETS)
    return sum(
        LORA_RANK * (module.in_features + module.out_features)
        for name, module in model.lang_encoder.named_modules()
        if isinstance(module, nn.Linear) and pattern.match(name)
    )


def decays(parameter_name: str) -> bool:
    return "gated_cross_attn_layer" in parameter_name and not any(k in parameter_name for k in NO_DECAY)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: decayed and not."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if decays(name) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # devices with torch's fused AdamW kernel that this project runs on


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, with torch's fused kernel when every trainable parameter is on a CPU or CUDA
    device (as transformers' Trainer does by default): one call updates every parameter, where the default loops
    over them, a few operations each (`scripts/benchmark_train_step.py` measures the difference)."""
    groups = parameter_groups(model, weight_decay)
    fused = all(parameter.device.type in FUSED_ADAMW_DEVICES for group in groups for parameter in group["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


__all__ = ["FP32_MODULES", "LORA_TARGETS", "TRAINABLE_SETS", "adamw", "apply", "decays", "freeze_for",
           "lora_parameter_count", "parameter_groups"]
