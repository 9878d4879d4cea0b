"""The reference implementation, open_flamingo 2.0.1, built by its own factory from local folders under transformers 5.

Shared by the parity tests' reference builder (tests/openflamingo_reference.py) and scripts/benchmark_vs_reference.py,
so that both run the reference the same way: one compatibility patch, one open_clip config format, one factory call,
and one definition of the checkpoint OpenFlamingo releases. open_flamingo pins torch 2.0.1, hence

    pip install --no-deps open-flamingo==2.0.1 einops-exts

It is imported inside the functions, so that this module imports without it (the tests skip, saying so).
"""

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# Modules that open_flamingo registers twice (the decoder layers and cross-attention blocks under a second name) and
# the frozen vision encoder: none of them is in a released checkpoint.
_NOT_RELEASED = ("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.", "vision_encoder.")


def patch_for_transformers_5() -> None:
    """Two changes of transformers 5 that open_flamingo 2.0.1 predates: `generate` leaves out an all-ones
    attention_mask, which `FlamingoLMMixin.forward` takes positionally (TypeError), and the LM's `past_key_values`
    argument is now `cache` (a deprecation warning on every forward). Idempotent."""
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin

    if getattr(FlamingoLMMixin, "patched_for_transformers_5", False):
        return
    forward = FlamingoLMMixin.forward

    def patched(self, input_ids=None, attention_mask=None, **kwargs):
        takes_cache = "cache" in inspect.signature(super(FlamingoLMMixin, self).forward).parameters
        if takes_cache and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
            if cache is not None:
                kwargs["cache"] = cache
        return forward(self, input_ids, attention_mask, **kwargs)

    FlamingoLMMixin.forward = patched
    FlamingoLMMixin.patched_for_transformers_5 = True


def save_open_clip(folder: Path, name: str, vision: dict, generator: torch.Generator | None = None) -> tuple[Path, Path]:
    """An open_clip CLIP shaped like OpenAI's (class token, QuickGELU) with the `vision` sizes (image_size, layers,
    width, head_width, patch_size), registered under `name`: its config `folder/<name>.json` and its weights
    `folder/open_clip_model.safetensors`, both returned. Its patch tokens come before ln_post, as with the open_clip
    OpenFlamingo was trained with (<= 2.20). With a `generator`, its LayerNorms are random too."""
    import open_clip

    config = {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {**vision, "final_ln_after_pool": True},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(config_path)
    clip = open_clip.create_model(name, pretrained=None)
    if generator is not None:
        randomize_norms(clip, generator)
    weights = folder / "open_clip_model.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in clip.state_dict().items()}, weights)
    return config_path, weights


def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """LayerNorm and RMSNorm start at weight 1 and bias 0, which hides a norm that a converter drops or swaps."""
    with torch.no_grad():
        for norm in module.modules():
            if "LayerNorm" not in type(norm).__name__ and "RMSNorm" not in type(norm).__name__:
                continue
            for start, parameter in ((1.0, getattr(norm, "weight", None)), (0.0, getattr(norm, "bias", None))):
                if isinstance(parameter, torch.Tensor):
                    parameter.copy_(start + 0.1 * torch.randn(parameter.shape, generator=generator))


def build_open_flamingo(clip_name: str, clip_weights: Path, lm_folder: Path, cross_attn_every_n_layers: int):
    """OpenFlamingo from its own factory, offline, in eval mode: `(model, tokenizer)`. The factory appends
    `<|endofchunk|>`, `<image>` and `<PAD>` to the base tokenizer and resizes the LM to fit them."""
    from open_flamingo import create_model_and_transforms

    patch_for_transformers_5()
    model, _, tokenizer = create_model_and_transforms(
        clip_name, str(clip_weights), str(lm_folder), str(lm_folder),
        cross_attn_every_n_layers=cross_attn_every_n_layers, use_local_files=True,
    )
    return model.eval(), tokenizer


def open_gates(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh gates are 0, and tanh(0) switches the images off; set them to ±U(0.5, 1), so that the images change
    the logits and agreement with the reference covers the vision path."""
    with torch.no_grad():
        for name, gate in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                sign = 1 if torch.rand(1, generator=generator).item() < 0.5 else -1
                gate.copy_(sign * torch.empty_like(gate).uniform_(0.5, 1.0, generator=generator))


def release_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's training script saves (`checkpoint.pt`): the trainable parameters and the embeddings,
    without the aliases. `named_parameters` names a tied weight once, so MPT's output head (tied to `wte`) is left
    out, as in the released files."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {
        name: tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith(_NOT_RELEASED) and (name in trainable or "embed" in name)
    }
