"""OpenFlamingo `checkpoint.pt` and Otter `final_weights.pt` files -> Hugging Face folders, in one step.

    flamingo-convert checkpoint.pt out/ --lm anas-awadalla/mpt-7b --open-clip-model ViT-L-14 \
        --open-clip-pretrained openai --cross-attn-every-n-layers 4

A released OpenFlamingo checkpoint holds only what OpenFlamingo trained: the perceiver, the gated
cross-attention blocks and the LM's input embeddings (plus GPT-NeoX's `embed_out`; Otter's files add the
output head). The converter joins it with the frozen parts it was trained on top of (the base language
model and the CLIP vision tower), renames keys to this library's layout, adapts the embedding rows of the
added tokens, and writes a `save_pretrained` folder with the processor next to the weights.

Key layout. open_flamingo 2.0.1 names differ from the published Hugging Face layout (Otter's names, which
this library's module tree mirrors) in these places:

    perceiver.layers.<j>.0.<x>                     -> perceiver.layers.<j>.<x>
    perceiver.layers.<j>.1.<k>                     -> perceiver.layers.<j>.feed_forward.<k>
    ...gated_cross_attn_layer.ff.<k>               -> ...gated_cross_attn_layer.feed_forward.<k>
    lang_encoder.<layers>.<i>.<x> (stock LM)       -> lang_encoder.<layers>.<i>.decoder_layer.<x>
    lang_encoder.gated_cross_attn_layers.<i>.<x>   -> lang_encoder.<layers>.<i>.gated_cross_attn_layer.<x>
    lang_encoder.old_decoder_blocks.<i>.<x>        -> lang_encoder.<layers>.<i>.decoder_layer.<x>
    lang_encoder.embed_out.*  (GPT-NeoX)           -> lang_encoder.lm_head.*  (renamed in transformers 5)
    vision_encoder.[visual.]<open_clip name>       -> vision_encoder.<CLIPVisionModel name>

The two `lang_encoder.*_layers`/`old_decoder_blocks` forms are aliases OpenFlamingo registers twice; v1
checkpoints kept them. Otter files already use the library's names and pass through unchanged. The vision
tower, an open_clip `VisionTransformer`, maps exactly onto transformers' `CLIPVisionModel` (fused `in_proj`
split into q/k/v). The features OpenFlamingo was trained with are the patch tokens *before* `ln_post` (open_clip
<= 2.20), which is what the model takes (`last_hidden_state[:, 1:]`), whatever open_clip is installed.

Token rows. The special tokens are appended to the base vocabulary V in a fixed order, so their ids are
row numbers: OpenFlamingo `<|endofchunk|>`=V, `<image>`=V+1, `<PAD>`=V+2 (V+3 rows); Otter
`<|endofchunk|>`=V, `<image>`=V+1, `<answer>`=V+2, `<PAD>`=V+3 (V+4 rows). `<PAD>` is only added when the base
tokenizer has no pad token. Rows are moved by token name from the checkpoint's order to the target's: converting
an OpenFlamingo checkpoint to Otter moves `<PAD>` to V+3 and gives `<answer>` (V+2) the mean of the base
vocabulary's rows, in the input embedding and in an untied output head alike. The checkpoint's order is read off
its row count: V+3 (V+2 with a pad-bearing tokenizer) rows is OpenFlamingo's, as its factory resized to exactly
that; any other count (Otter's V+4, or an embedding padded to a multiple such as Otter-MPT's 50432 rows) is
taken to follow the target's order, which is how Otter's own code read those rows.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from .configuration_flamingo import FlamingoConfig
from .hub import write_model_card
from .modeling_flamingo import FlamingoModel, find_decoder_layers, spliced_name
from .processing_flamingo import PAD_TOKEN, FlamingoProcessor
from .registry import classes_of

logger = logging.get_logger(__name__)

# CLIP's preprocessing (OpenAI ViT-L/14 and open_clip's default).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------------
# open_clip vision tower -> CLIPVisionModel
# --------------------------------------------------------------------------------------------------
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
# open_clip vision settings CLIPVisionModel cannot express, with the values it can.
_OPEN_CLIP_SUPPORTED_VALUES = {
    "timm_model_name": (None,),
    "ls_init_value": (None,),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "pool_type": ("tok", "avg"),  # both return the patch tokens without the class token
    "act_kwargs": (None, {}),
    "norm_kwargs": (None, {}),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}


def _square(value: int | list[int] | tuple[int, int], name: str) -> int:
    """CLIPVisionConfig takes one side length; open_clip also allows (height, width)."""
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"open_clip {name} {tuple(value)} is not square; CLIPVisionModel needs square images and patches")
    return value[0]


def open_clip_vision_config(model_config: dict, quick_gelu: bool | None = None) -> CLIPVisionConfig:
    """A `CLIPVisionConfig` equal to an open_clip model config's vision tower (e.g. `ViT-L-14.json`).

    `quick_gelu` overrides the config's flag: open_clip's `ViT-L-14` config says GELU, but its `openai`
    weights were trained with QuickGELU, which OpenFlamingo's open_clip (<= 2.20) then used."""
    vision = model_config["vision_cfg"]
    if not isinstance(vision["layers"], int):
        raise ValueError(f"open_clip vision tower with layers={vision['layers']} is a ResNet, not a ViT; only ViTs map onto CLIPVisionModel")
    for key, supported in _OPEN_CLIP_SUPPORTED_VALUES.items():
        if vision.get(key, supported[0]) not in supported:
            raise ValueError(f"open_clip vision_cfg {key}={vision[key]!r} has no CLIPVisionModel equivalent (supported: {supported})")
    width = vision["width"]
    if quick_gelu is None:
        quick_gelu = model_config.get("quick_gelu", False)
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=width // vision.get("head_width", 64),
        image_size=_square(vision["image_size"], "image_size"),
        patch_size=_square(vision["patch_size"], "patch_size"),
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        layer_norm_eps=1e-5,  # torch's LayerNorm default, which open_clip uses
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


def clip_image_processor(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> CLIPImageProcessor:
    """CLIP preprocessing at the vision tower's resolution: bicubic resize of the short side, center crop."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )


@dataclass
class VisionTower:
    """A CLIP vision encoder in `CLIPVisionModel`'s layout and its preprocessing, whatever it was loaded from."""

    config: CLIPVisionConfig
    state_dict: dict[str, torch.Tensor]
    image_processor: CLIPImageProcessor


def hf_vision_tower(name_or_path: str | os.PathLike) -> VisionTower:
    """A transformers CLIP (`CLIPModel` or `CLIPVisionModel`, hub id or folder), e.g. `openai/clip-vit-large-patch14`."""
    model = CLIPVisionModel.from_pretrained(name_or_path, dtype=torch.float32)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(name_or_path)
    except OSError:  # a vision-model folder saved without its preprocessing
        image_processor = clip_image_processor(model.config.image_size)
    return VisionTower(model.config, model.state_dict(), image_processor)


def open_clip_quick_gelu(model_config: dict, name: str, pretrained: str | os.PathLike) -> bool:
    """Whether the weights were trained with QuickGELU: the model config says so, or the pretrained tag's record
    does. open_clip >= 2.23 builds `ViT-L-14` with GELU even for its `openai` (QuickGELU) weights and only warns;
    OpenFlamingo's open_clip (<= 2.20) loaded `openai` weights with QuickGELU."""
    from open_clip.pretrained import get_pretrained_cfg

    tag_config = {} if os.path.isfile(pretrained) else get_pretrained_cfg(name, str(pretrained))
    return bool(model_config.get("quick_gelu") or tag_config.get("quick_gelu"))


def open_clip_vision_tower(model: str | os.PathLike, pretrained: str | os.PathLike) -> VisionTower:
    """An open_clip model, as OpenFlamingo built it: `model` is a registered name (`ViT-L-14`) or a model-config
    JSON file; `pretrained` a tag (`openai`, downloaded by open_clip) or a weights file."""
    import open_clip

    name = str(model)
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    model_config = open_clip.get_model_config(name)
    if model_config is None:
        raise ValueError(f"open_clip knows no model {name!r}; pass a registered name (e.g. ViT-L-14) or a config .json file")
    quick_gelu = open_clip_quick_gelu(model_config, name, pretrained)
    clip = open_clip.create_model(name, pretrained=str(pretrained), force_quick_gelu=quick_gelu)
    config = open_clip_vision_config(model_config, quick_gelu=quick_gelu)
    mean = getattr(clip.visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(clip.visual, "image_std", None) or OPENAI_CLIP_STD
    return VisionTower(config, open_clip_vision_to_hf(clip.visual.state_dict()), clip_image_processor(config.image_size, mean, std))


# --------------------------------------------------------------------------------------------------
# Checkpoint files and key names
# --------------------------------------------------------------------------------------------------
_GATED_KEY = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.")
# Buffers that older libraries saved into state dicts (LLaMA's rotary `inv_freq`, CLIP's `position_ids`).
_STALE_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.position_ids)$")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict of an OpenFlamingo `checkpoint.pt`, an Otter `final_weights.pt`, or a training
    checkpoint (`{"model_state_dict": ...}`, keys possibly prefixed `module.` by DDP).

    Only `weights_only=True` loading: a checkpoint is data, and unpickling arbitrary objects runs code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not Path(path).exists() else f"checkpoint {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(error).__name__}: {error}); "
            "only plain tensor dicts (checkpoint.pt / final_weights.pt / training checkpoints) are accepted"
        ) from error
    if isinstance(checkpoint, dict):
        for wrapper in ("model_state_dict", "model"):
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} is not a state dict (a flat dict of tensors), so not a Flamingo checkpoint")
    state_dict = {key.removeprefix("module."): tensor for key, tensor in checkpoint.items()}
    if not any(key.startswith("perceiver.") or "gated_cross_attn_layer" in key for key in state_dict):
        sample = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(
            f"{path} is not an OpenFlamingo/Otter checkpoint: none of its {len(state_dict)} keys is a perceiver or "
            f"gated cross-attention weight (first keys: {sample})"
        )
    return state_dict


def _vision_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vision_encoder.*` entries as `CLIPVisionModel` keys. OpenFlamingo v2 stores open_clip's `visual` module,
    v1 the whole CLIP (`vision_encoder.visual.*`, text tower unused), Otter transformers' CLIP (`vision_model.*`)."""
    vision = {k.removeprefix("vision_encoder."): v for k, v in state_dict.items() if _is_vision_key(k)}
    if any(k.startswith("vision_model.") for k in vision):
        return {k.removeprefix("vision_model."): v for k, v in vision.items()}
    if any(k.startswith("visual.") for k in vision):
        vision = {k.removeprefix("visual."): v for k, v in vision.items() if k.startswith("visual.")}
    return open_clip_vision_to_hf(vision)


def _hf_key(key: str, layers_prefix: str) -> tuple[str, bool]:
    """This library's name for a non-vision checkpoint key, and whether the key was an alias (see module doc)."""
    aliases = [
        (r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.", rf"{layers_prefix}\1.gated_cross_attn_layer."),
        (r"^lang_encoder\.old_decoder_blocks\.(\d+)\.", rf"{layers_prefix}\1."),
    ]
    renames = [
        (r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1."),
        (r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward."),
        (r"\.gated_cross_attn_layer\.ff\.", ".gated_cross_attn_layer.feed_forward."),
        (r"^lang_encoder\.embed_out\.", "lang_encoder.lm_head."),
    ]
    is_alias = False
    for pattern, replacement in aliases:
        key, found = re.subn(pattern, replacement, key)
        is_alias = is_alias or bool(found)
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return spliced_name(key, layers_prefix), is_alias


def _is_language_or_perceiver_key(key: str) -> bool:
    return not key.startswith("vision_encoder.") and not _STALE_BUFFERS.search(key)


def _is_vision_key(key: str) -> bool:
    return key.startswith("vision_encoder.") and not _STALE_BUFFERS.search(key)


def openflamingo_to_hf(state_dict: dict[str, torch.Tensor], decoder_layers_path: str) -> dict[str, torch.Tensor]:
    """OpenFlamingo / Otter state dict (trainable subset or full) -> this library's layout.

    `decoder_layers_path` is the LM's decoder-layer list, e.g. `model.layers` or `transformer.blocks`. Alias
    keys fill in only what the primary names lack, so v1 files with both forms give each tensor once."""
    layers = f"lang_encoder.{decoder_layers_path}."
    primary, secondary = {}, {}
    for key, tensor in state_dict.items():
        if _is_language_or_perceiver_key(key):
            new_key, is_alias = _hf_key(key, layers)
            (secondary if is_alias else primary)[new_key] = tensor
    vision = {f"vision_encoder.{k}": v for k, v in _vision_weights(state_dict).items()}
    return vision | secondary | primary


def cross_attention_every(weights: dict[str, torch.Tensor], layers_path: str, num_layers: int, every: int | None) -> int:
    """`cross_attn_every_n_layers` of a converted checkpoint: checked against `every` if given, else inferred.

    A wrong value would silently build blocks the checkpoint has no weights for, or drop trained ones."""
    if every is not None and not 1 <= every <= num_layers:
        raise ValueError(
            f"cross_attn_every_n_layers={every} must be between 1 and the language model's {num_layers} decoder layers"
        )
    found: dict[str, set[int]] = {}
    for key in weights:
        if match := _GATED_KEY.match(key):
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not found:
        raise ValueError("The checkpoint has no gated cross-attention weights (lang_encoder.<layers>.<i>.gated_cross_attn_layer.*)")
    if layers_path not in found:
        raise ValueError(
            f"The checkpoint's cross-attention blocks sit in lang_encoder.{'/'.join(sorted(found))}, but the base "
            f"language model's decoder layers are lang_encoder.{layers_path}: it was trained on another language model"
        )
    indices = sorted(found[layers_path])

    def layers_for(n: int) -> list[int]:
        return [i for i in range(num_layers) if (i + 1) % n == 0]

    inferred = indices[0] + 1
    fits = layers_for(inferred) == indices
    if every is None:
        if not fits:
            raise ValueError(f"The checkpoint has cross-attention before decoder layers {indices}, not every n-th of the LM's {num_layers}")
        return inferred
    if layers_for(every) != indices:
        hint = f"; the checkpoint matches cross_attn_every_n_layers={inferred}" if fits else ""
        raise ValueError(
            f"cross_attn_every_n_layers={every} puts cross-attention before decoder layers {layers_for(every)} of the "
            f"LM's {num_layers}, but the checkpoint has it before layers {indices}{hint}"
        )
    return every


# --------------------------------------------------------------------------------------------------
# Token rows
# --------------------------------------------------------------------------------------------------
def checkpoint_token_order(num_rows: int, base_vocab: int, openflamingo_tokens: tuple[str, ...], target_tokens: tuple[str, ...]) -> tuple[str, ...]:
    """The added token each embedding row after the base vocabulary holds, read off the row count (see module doc)."""
    added = num_rows - base_vocab
    if added < len(openflamingo_tokens):
        raise ValueError(
            f"The base tokenizer has {base_vocab} tokens, so the added tokens {openflamingo_tokens} need "
            f"{base_vocab + len(openflamingo_tokens)} embedding rows, but the checkpoint's embedding has {num_rows}: "
            "it was not trained on this base language model (or the tokenizer is not the one it was trained with)"
        )
    if added == len(openflamingo_tokens):
        return openflamingo_tokens
    if added != len(target_tokens):
        logger.warning(
            f"The checkpoint's embedding has {num_rows} rows, {added} past the base vocabulary: taking rows "
            f"{base_vocab}.. to be {target_tokens} in this order and keeping the rows after them as padding"
        )
    return target_tokens


def reorder_token_rows(weight: torch.Tensor, base_vocab: int, source: tuple[str, ...], target: tuple[str, ...]) -> torch.Tensor:
    """Move the added tokens' rows from `source` order to `target` order, by token name. A token the checkpoint
    never had gets the mean of the base vocabulary's rows (a neutral start that changes no other token's logits);
    rows after the added tokens (embedding padding) stay at the end."""
    if source == target:
        return weight
    mean = weight[:base_vocab].float().mean(dim=0).to(weight.dtype)
    rows = [weight[base_vocab + source.index(token)] if token in source else mean for token in target]
    padding = weight[base_vocab + len(source) :]
    for token in set(target) - set(source):
        logger.info(f"{token} is new to this checkpoint: its embedding rows start at the mean of the base vocabulary's")
    return torch.cat([weight[:base_vocab], torch.stack(rows), padding])


def fit_rows(weight: torch.Tensor, num_rows: int, base_vocab: int) -> torch.Tensor:
    """The base LM's output head cut or grown to the checkpoint's rows, as OpenFlamingo's `resize_token_embeddings`
    did. OpenFlamingo drew grown rows at random and never saved them; the mean of the base rows is a deterministic
    stand-in with the same role (the added tokens start out no more likely than an average token)."""
    if weight.shape[0] < base_vocab:
        raise ValueError(f"The base language model's output layer has {weight.shape[0]} rows, fewer than its tokenizer's {base_vocab} tokens")
    if weight.shape[0] >= num_rows:
        return weight[:num_rows]
    mean = weight[:base_vocab].float().mean(dim=0).to(weight.dtype)
    return torch.cat([weight, mean.expand(num_rows - weight.shape[0], -1)])


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------
def target_classes(target: str) -> tuple[type[FlamingoConfig], type[FlamingoModel], type[FlamingoProcessor]]:
    """Config, model and processor classes of the registered model type `target` (`flamingo`; `otter` comes from
    the otter package, found through its plugin entry point)."""
    return classes_of(target)


def _parameter_names(module: nn.Module, parameter: nn.Parameter) -> list[str]:
    """Every name under which `parameter` is registered (tied weights have several)."""
    return [name for name, p in module.named_parameters(remove_duplicate=False) if p is parameter]


def _check_against_model(weights: dict[str, torch.Tensor], sources: dict[str, str], model_class: type[FlamingoModel], config: FlamingoConfig) -> None:
    """Compare the assembled weights with the model the config describes (built on the meta device, no memory),
    so that a wrong input fails here with its key and shapes rather than deep inside loading."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint weights have no place in the model, e.g. {[sources.get(k, k) for k in unexpected[:5]]}")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{sources.get(key, key)} has shape {list(tensor.shape)}, but the model built from the base language model "
                f"and vision tower expects {list(expected[key])} for {key}"
            )
    trained = [k for k in expected if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]
    missing = [k for k in trained if k not in weights]
    if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} of the {len(trained)} perceiver/cross-attention weights, e.g. {missing[:5]}")


def _added_tokens(base_tokenizer: PreTrainedTokenizerBase, processor: FlamingoProcessor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tokens OpenFlamingo appended to this base tokenizer and those the target appends, in order; checks
    that the processor gave the target's the next free ids, since the embedding rows are matched by those ids."""
    pad = () if base_tokenizer.pad_token is not None else (PAD_TOKEN,)
    openflamingo_tokens = (*FlamingoConfig.special_tokens, *pad)
    target_tokens = (*processor.config_class.special_tokens, *pad)
    base_vocab = len(base_tokenizer)
    ids = processor.tokenizer.convert_tokens_to_ids(list(target_tokens))
    if ids != list(range(base_vocab, base_vocab + len(target_tokens))):
        raise ValueError(
            f"The tokenizer gave the added tokens {target_tokens} ids {ids}, not the next free ids from {base_vocab}: "
            "does the base tokenizer already contain some of them?"
        )
    return openflamingo_tokens, target_tokens


def _adapt_token_rows(
    weights: dict[str, torch.Tensor],
    language_model: PreTrainedModel,
    base_vocab: int,
    openflamingo_tokens: tuple[str, ...],
    target_tokens: tuple[str, ...],
) -> tuple[int, set[str]]:
    """Put the input embedding, and an untied output head, into the target's token order (in `weights`).

    The input embedding comes from the checkpoint (OpenFlamingo saves every "embed" weight); the head too when it
    has one (Otter, GPT-NeoX's `embed_out`), else from the base LM. Returns the vocabulary size (embedding rows)
    and the base LM's parameter names these replace."""
    input_embedding = language_model.get_input_embeddings().weight
    embedding_names = _parameter_names(language_model, input_embedding)
    embedding_key = f"lang_encoder.{embedding_names[0]}"
    if embedding_key not in weights:
        raise ValueError(f"The checkpoint has no input embedding ({embedding_key}), so the added tokens' embeddings are unknown")
    num_rows = weights[embedding_key].shape[0]
    order = checkpoint_token_order(num_rows, base_vocab, openflamingo_tokens, target_tokens)
    weights[embedding_key] = reorder_token_rows(weights[embedding_key], base_vocab, order, target_tokens)
    for name in embedding_names[1:]:  # tied aliases (MPT's lm_head): the model ties them again on load
        weights.pop(f"lang_encoder.{name}", None)
    replaced = set(embedding_names)
    head = language_model.get_output_embeddings()
    if head is not None and head.weight is not input_embedding:
        head_names = _parameter_names(language_model, head.weight)
        head_key = f"lang_encoder.{head_names[0]}"
        head_weight = weights[head_key] if head_key in weights else fit_rows(head.weight.detach(), num_rows, base_vocab)
        weights[head_key] = reorder_token_rows(head_weight, base_vocab, order, target_tokens)
        replaced.update(head_names)
    return weights[embedding_key].shape[0], replaced


def load_base_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The base tokenizer, tokenizing as in the checkpoints' training. LLaMA tokenizers are loaded `legacy`: the
    text after a special token starts a new word (`<image>a` -> `<image>`, `▁a`), as sentencepiece and every
    transformers 4.x did for OpenFlamingo and Otter; transformers 5 defaults to `legacy=False`, which does not."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if getattr(tokenizer, "legacy", True) is False:
        logger.info(f"Loading the {type(tokenizer).__name__} of {name_or_path} with legacy=True, as the checkpoints were trained")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, legacy=True)
    return tokenizer


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    lm: str | os.PathLike,
    vision_tower: VisionTower,
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    target: str = "flamingo",
    cross_attn_every_n_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[FlamingoModel, FlamingoProcessor]:
    """Build the Hugging Face model and processor from an OpenFlamingo/Otter checkpoint, in memory.

    Args:
        checkpoint: `checkpoint.pt`, `final_weights.pt` or a training checkpoint (see `load_checkpoint`).
        lm: the base causal LM it was trained on (hub id or folder), e.g. `anas-awadalla/mpt-7b`.
        vision_tower: from `hf_vision_tower` or `open_clip_vision_tower`.
        tokenizer: the base tokenizer, if not `lm`'s (see `load_base_tokenizer`): a name, a folder, or a tokenizer
            object used as it is.
        target: `"flamingo"`, or `"otter"` (adds `<answer>`).
        cross_attn_every_n_layers: checked against the checkpoint; inferred from it when None.
        dtype: of the weights (the released files are float32).

    Weights in the checkpoint take precedence over the base LM's and the vision tower's (the checkpoint is the
    trained model), so full state dicts convert too. The model's tensors share memory with the inputs'."""
    config_class, model_class, processor_class = target_classes(target)
    logger.info(f"Reading {checkpoint}")
    state_dict = load_checkpoint(checkpoint)
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        base_tokenizer = tokenizer
    else:
        base_tokenizer = load_base_tokenizer(tokenizer or lm)
    processor = processor_class.from_base_tokenizer(base_tokenizer, image_processor=vision_tower.image_processor)
    openflamingo_tokens, target_tokens = _added_tokens(base_tokenizer, processor)

    logger.info(f"Loading the base language model {lm}")
    language_model = AutoModelForCausalLM.from_pretrained(lm, dtype=dtype)
    layers_path, layers = find_decoder_layers(language_model, None)
    layers_prefix = f"lang_encoder.{layers_path}."
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in openflamingo_to_hf(state_dict, layers_path).items()}
    sources = {_hf_key(k, layers_prefix)[0]: f"checkpoint key {k!r}" for k in state_dict if _is_language_or_perceiver_key(k)}
    every = cross_attention_every(weights, layers_path, len(layers), cross_attn_every_n_layers)
    vocab_size, replaced = _adapt_token_rows(weights, language_model, len(base_tokenizer), openflamingo_tokens, target_tokens)

    frame_embs = weights.get("perceiver.frame_embs")
    config = config_class(
        vision_config=vision_tower.config.to_dict(),
        text_config={**language_model.config.to_dict(), "vocab_size": vocab_size},
        cross_attn_every_n_layers=every,
        max_num_frames=None if frame_embs is None else frame_embs.shape[0],
        **{field: processor.tokenizer.convert_tokens_to_ids(token) for field, token in config_class.token_id_fields.items()},
    )
    _check_against_model(weights, sources, model_class, config)

    base = {spliced_name(f"lang_encoder.{k}", layers_prefix): v for k, v in language_model.state_dict().items() if k not in replaced}
    vision = {f"vision_encoder.{k}": v.to(dtype) for k, v in vision_tower.state_dict.items()}
    model, info = model_class.from_pretrained(None, config=config, state_dict=base | vision | weights, dtype=dtype, output_loading_info=True)
    if problems := {k: v for k, v in info.items() if v}:
        raise RuntimeError(f"Loading the assembled weights went wrong: {problems}")
    model.generation_config.pad_token_id = processor.pad_token_id
    return model.eval(), processor


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
# The published 9B folders' shard size: easier to download in parts than transformers' 50 GB default.
MAX_SHARD_SIZE = "10GB"


def _sibling(path: Path, purpose: str) -> Path:
    """An unused hidden name next to `path`: renames within one folder are atomic."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{purpose}")


def conversion_record(checkpoint: str | os.PathLike, lm: str | os.PathLike, vision_encoder: str | None, target: str, dtype: torch.dtype, parity: str | None = None) -> dict[str, str]:
    """What the model card says about a conversion (see `flamingo.hub.write_model_card`)."""
    record = {"source": str(checkpoint), "language model": str(lm), "target": target, "dtype": str(dtype).removeprefix("torch.")}
    if vision_encoder is not None:
        record["vision encoder"] = vision_encoder
    return record | ({"parity": parity} if parity else {})


def save_atomically(
    model: PreTrainedModel,
    processor: FlamingoProcessor,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    conversion: dict[str, str] | None = None,
) -> Path:
    """`save_pretrained` the model and processor into `output_dir` without ever leaving a half-written folder
    there: write into a temporary folder beside it (same file system), then rename. An existing folder is only
    replaced (with `overwrite`) once the new one is complete. The model card records `conversion` (from
    `conversion_record`); its base models are the language model's and the vision encoder's names."""
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output_dir, "partial")
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would end up on the output folder
    try:
        model.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)
        processor.save_pretrained(staging)
        base_models = [conversion[key] for key in ("language model", "vision encoder") if key in (conversion or {})]
        write_model_card(staging, name=output_dir.name, base_models=base_models, conversion=conversion)
        if not output_dir.exists():
            staging.rename(output_dir)
            return output_dir
        previous = _sibling(output_dir, "previous")
        output_dir.rename(previous)
        try:
            staging.rename(output_dir)
        except BaseException:
            previous.rename(output_dir)
            raise
        if previous.is_dir():
            shutil.rmtree(previous)
        else:
            previous.unlink()
        return output_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def convert(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    lm: str | os.PathLike,
    vision_tower: VisionTower,
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    target: str = "flamingo",
    cross_attn_every_n_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    vision_encoder: str | None = None,
    parity: str | None = None,
) -> Path:
    """Convert a checkpoint (see `convert_checkpoint`) and write it with its processor to `output_dir`, which then
    loads with `FlamingoModel`/`OtterModel.from_pretrained` or `AutoModel`/`AutoProcessor` alone. The model card
    names the inputs (`vision_encoder`: where `vision_tower` came from) and `parity`, a figure measured elsewhere
    (e.g. against the original implementation), when given."""
    model, processor = convert_checkpoint(
        checkpoint, lm, vision_tower, tokenizer=tokenizer, target=target,
        cross_attn_every_n_layers=cross_attn_every_n_layers, dtype=dtype,
    )
    conversion = conversion_record(checkpoint, lm, vision_encoder, target, dtype, parity)
    return save_atomically(model, processor, output_dir, overwrite=overwrite, conversion=conversion)
