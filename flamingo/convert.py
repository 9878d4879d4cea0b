"""OpenFlamingo / Otter checkpoints -> this library's key layout.

OpenFlamingo's `checkpoint.pt` names (open_flamingo 2.0.1) differ from the published Hugging Face
layout (Otter's names, which this library's module tree mirrors) in three places:

    perceiver.layers.<j>.0.<x>                 -> perceiver.layers.<j>.<x>
    perceiver.layers.<j>.1.<k>                 -> perceiver.layers.<j>.feed_forward.<k>
    ...gated_cross_attn_layer.ff.<k>           -> ...gated_cross_attn_layer.feed_forward.<k>
    lang_encoder.<layers>.<i>.<x> (stock LM)   -> lang_encoder.<layers>.<i>.decoder_layer.<x>

and its vision tower is an open_clip `VisionTransformer`, mapped here onto transformers'
`CLIPVisionModel` (fused `in_proj` split into q/k/v). The features OpenFlamingo was trained with are
the patch tokens *before* `ln_post`, which is what `CLIPVisionModel.last_hidden_state[:, 1:]` gives.
"""

import re

import torch
from transformers import CLIPVisionConfig

# open_clip VisionTransformer -> CLIPVisionModel, for everything but the fused attention projection.
_OPEN_CLIP_RENAMES = [
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^conv1\.weight$", "embeddings.patch_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (r"^ln_post\.", "post_layernorm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
_FUSED_ATTENTION = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
# Not part of CLIPVisionModel: the image-text projection and open_clip's attention-pool extras.
_OPEN_CLIP_UNUSED = re.compile(r"^(proj|attn_pool\..*|ln_post_pool\..*)$")


def open_clip_vision_config(model_config: dict) -> CLIPVisionConfig:
    """A `CLIPVisionConfig` equal to an open_clip model config's vision tower (e.g. `ViT-L-14.json`)."""
    vision = model_config["vision_cfg"]
    width = vision["width"]
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=width // vision.get("head_width", 64),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_act="quick_gelu" if model_config.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,
    )


def open_clip_vision_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `model.visual` state dict -> `CLIPVisionModel` state dict."""
    converted = {}
    for key, tensor in state_dict.items():
        if _OPEN_CLIP_UNUSED.match(key):
            continue
        if fused := _FUSED_ATTENTION.match(key):
            layer, kind = fused.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in _OPEN_CLIP_RENAMES:
            new_key, found = re.subn(pattern, replacement, key)
            if found:
                converted[new_key] = tensor
                break
        else:
            raise KeyError(f"open_clip vision key {key!r} has no CLIPVisionModel counterpart")
    return converted


def openflamingo_to_hf(
    state_dict: dict[str, torch.Tensor], decoder_layers_path: str
) -> dict[str, torch.Tensor]:
    """OpenFlamingo `Flamingo` state dict (trainable subset or full) -> this library's layout.

    `decoder_layers_path` is the LM's decoder-layer list, e.g. `model.layers` or `transformer.blocks`."""
    layers = re.escape(f"lang_encoder.{decoder_layers_path}.")
    renames = [
        (r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1."),
        (r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward."),
        (rf"^({layers}\d+\.gated_cross_attn_layer)\.ff\.", r"\1.feed_forward."),
        (rf"^({layers}\d+)\.(?!decoder_layer\.|gated_cross_attn_layer\.)", r"\1.decoder_layer."),
    ]
    vision = {k.removeprefix("vision_encoder."): v for k, v in state_dict.items() if k.startswith("vision_encoder.")}
    converted = {f"vision_encoder.{k}": v for k, v in open_clip_vision_to_hf(vision).items()}
    for key, tensor in state_dict.items():
        if key.startswith(("vision_encoder.", "lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")):
            continue  # vision mapped above; the other two are aliases of the wrapped layers
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        converted[key] = tensor
    return converted
