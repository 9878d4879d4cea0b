"""Flamingo (Alayrac et al., 2022) as OpenFlamingo and Otter built it, on a stock transformers causal LM.

    pixels ─ vision_encoder (CLIP) ─ perceiver ─ media latents ──────────┐ (keys/values of every block)
    tokens ─ embeddings ─ [gated cross-attention → decoder layer] × N ─ norm ─ lm_head ─ logits

The language model is the unmodified transformers model (`LlamaForCausalLM`, `MptForCausalLM`, ...).
Each of its decoder layers is wrapped in a `FlamingoLayer` that holds the original layer as
`decoder_layer` and, every `cross_attn_every_n_layers` layers, a `GatedCrossAttentionBlock` as
`gated_cross_attn_layer`. The module tree therefore *is* the published checkpoint layout:

    vision_encoder.vision_model.*                          CLIPVisionModel
    perceiver.{latents, frame_embs, layers.<j>.*, norm.*}  PerceiverResampler
    lang_encoder.<decoder path>.<i>.decoder_layer.*        the LM's own decoder layer
    lang_encoder.<decoder path>.<i>.gated_cross_attn_layer.*

Which image each text token sees is decided once per forward (`attended_image`) and reaches the
cross-attention blocks through a context variable rather than through the LM's forward: some LMs
(MPT) drop extra keyword arguments before their layer loop, and a context variable keeps
concurrent calls (several requests in threads) apart without leaving state on modules.
"""

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_flamingo import FlamingoConfig
from .hub import export_code, exportable_class, has_own_model_card, model_auto_map, write_model_card
from .local_files import check_local_model
from .recipes import FP32_MODULES

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, d)
    key: torch.Tensor,  # (B, H, Tk, d)
    value: torch.Tensor,  # (B, H, Tk, d)
    attention_mask: torch.Tensor | None,  # bool (B, 1, Tq, Tk), True = may attend
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (B, Tq, H, d)


def attend(module: nn.Module, query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """Multi-head attention through transformers' attention functions: SDPA unless the model was
    loaded with `attn_implementation="eager"` (kernels without arbitrary masks fall back to SDPA)."""
    implementation = "eager" if module.config._attn_implementation == "eager" else "sdpa"
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    output, _ = attention(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0)
    return rearrange(output, "b t h d -> b t (h d)")


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm GELU MLP without biases; the indices 0/1/3 are the checkpoint's key names."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


# --------------------------------------------------------------------------------------------------
# Perceiver resampler: a variable number of patch features -> a fixed number of latents per image
# --------------------------------------------------------------------------------------------------
class PerceiverBlock(GradientCheckpointingLayer):
    """Latents attend to [media features; latents], then a feed-forward; both residual."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim, heads, dim_head = config.vision_config.hidden_size, config.perceiver_heads, config.perceiver_dim_head
        self.config = config
        self.heads, self.scale, self.is_causal = heads, dim_head**-0.5, False
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.feed_forward = feed_forward(dim, config.perceiver_ff_mult)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        # latents (N or 1, n_latents, D_v); media (N, F·v, D_v), N = B·T_img; kept 3-D for bnb int8 on CPU.
        # The first block gets the learned latents once, (1, n_latents, D_v): its query and latent keys and values
        # are the same for every image, so they are projected once and broadcast (their gradients summed).
        images = media.shape[0]
        normed_latents = self.norm_latents(latents)
        query = self.to_q(normed_latents).expand(images, -1, -1)
        latent_keys_values = self.to_kv(normed_latents).expand(images, -1, -1)
        keys_values = torch.cat([self.media_keys_values(media), latent_keys_values], dim=1)
        key, value = keys_values.chunk(2, dim=-1)
        query, key, value = (rearrange(x, "n t (h d) -> n h t d", h=self.heads) for x in (query, key, value))
        latents = self.to_out(attend(self, query, key, value, None, self.scale)) + latents
        return self.feed_forward(latents) + latents

    def media_keys_values(self, media: torch.Tensor) -> torch.Tensor:
        """`to_kv(norm_media(media))`, (N, F·v, 2·inner). Media that take no gradient (a frozen vision tower's
        features) while the block trains go through `FrozenMediaProjection`, which skips autograd's gradient of the
        normed media, the largest product of a perceiver's backward pass that nothing needs."""
        norm = self.norm_media
        plain = type(norm) is nn.LayerNorm and type(self.to_kv) is nn.Linear  # not quantized, no adapter
        if not (plain and norm.weight is not None and norm.bias is not None and self.to_kv.bias is None):
            return self.to_kv(norm(media))
        trains = self.to_kv.weight.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad
        if not (trains and torch.is_grad_enabled() and not media.requires_grad):
            return self.to_kv(norm(media))
        return FrozenMediaProjection.apply(media, norm.weight, norm.bias, self.to_kv.weight, norm.eps)


class FrozenMediaProjection(torch.autograd.Function):
    """`linear(layer_norm(x, weight, bias), kv_weight)` for an input `x` that needs no gradient.

    With x̂ the normalized input and g the output's gradient, every parameter's gradient follows from one product,
    M = gᵀ·x̂ (out × in): ∂kv_weight = M·diag(weight) + (Σg)·biasᵀ, ∂weight = Σ_rows(kv_weight ⊙ M),
    ∂bias = (Σg)·kv_weight. Autograd would instead form g·kv_weight (rows × in) for the norm's gradients and then
    gᵀ·layer_norm(x) for the projection's: two products of that size instead of one. The forward pass is the same
    computation as the two modules (the same logits). It keeps `x` (alive anyway: the vision tower's output, which
    every block reads) and normalizes it again in the backward pass, rather than keeping a normalized copy per block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kv_weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias, kv_weight)
        ctx.eps = eps
        return nn.functional.linear(nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps), kv_weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, bias, kv_weight = ctx.saved_tensors
        normalized = nn.functional.layer_norm(x, x.shape[-1:], None, None, ctx.eps)
        # In the parameters' dtype: under autocast the output (and its gradient) may be bf16 while they are fp32.
        grad_rows = grad_output.flatten(0, -2).to(kv_weight.dtype)
        product = grad_rows.T @ normalized.flatten(0, -2).to(kv_weight.dtype)  # M = gᵀ·x̂, (out, in)
        grad_sum = grad_rows.sum(dim=0)  # Σg, (out,)
        grad_kv = product * weight + grad_sum[:, None] * bias if ctx.needs_input_grad[3] else None
        grad_weight = (kv_weight * product).sum(dim=0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum @ kv_weight if ctx.needs_input_grad[2] else None
        return None, grad_weight, grad_bias, grad_kv, None


class PerceiverResampler(nn.Module):
    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.perceiver_num_latents, dim))
        if config.max_num_frames is not None:
            self.frame_embs = nn.Parameter(torch.randn(config.max_num_frames, dim))
        else:
            self.frame_embs = None
        self.layers = nn.ModuleList([PerceiverBlock(config) for _ in range(config.perceiver_depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, v, D_v) patch features of N images (F frames each) -> (N, n_latents, D_v)."""
        features = features.to(self.latents.dtype)  # the vision tower may run in another dtype (e.g. bf16 vs fp32)
        num_frames = features.shape[1]
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(f"got {num_frames} frames per image; this model has {self.frame_embs.shape[0]} frame embeddings")
            features = features + self.frame_embs[:num_frames, None]
        elif num_frames > 1:
            raise ValueError(f"got {num_frames} frames per image, but this model takes images only (config.max_num_frames is None)")
        media = rearrange(features, "n f v d -> n (f v) d")
        latents = self.latents[None]  # (1, n_latents, D_v): the first block broadcasts it over the images
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)


# --------------------------------------------------------------------------------------------------
# Gated cross-attention, spliced before decoder layers
# --------------------------------------------------------------------------------------------------
@dataclass
class MediaCache:
    """Images encoded once per call or once per `generate`.

    `latents` are the perceiver's output. While no gradient is recorded (inference, generation), each
    cross-attention block stores its projected keys and values in `keys_values` on first use, so that
    decoding steps do not project the same images again."""

    latents: torch.Tensor  # (B, T_img, n_latents, D_v)
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.latents.shape[1]


@dataclass
class ImageRouting:
    """Which image latents each text token attends to in one forward, worked out once for all blocks."""

    sees_image: torch.Tensor  # bool (B, T_txt, 1): the token sees an image at all (the others get exactly zero)
    mask: torch.Tensor | None  # bool (B, 1, T_txt, T_img·n): the token may attend to the latent; None: to all given
    decoding_image: tuple[torch.Tensor, torch.Tensor] | None  # one token per row (decoding): (rows, 0-based image)
    num_latents: int

    @classmethod
    def of(cls, attended: torch.Tensor, num_images: int, num_latents: int) -> "ImageRouting":
        sees_image = ((attended >= 1) & (attended <= num_images))[..., None]
        if num_images == 1:  # whoever sees an image sees all its latents
            return cls(sees_image, None, None, num_latents)
        if attended.shape[1] == 1:  # decoding: the new token's image alone is given, so no mask is needed
            rows = torch.arange(attended.shape[0], device=attended.device)
            return cls(sees_image, None, (rows, (attended[:, 0] - 1).clamp(0, num_images - 1)), num_latents)
        latent_image = torch.arange(1, num_images + 1, device=attended.device).repeat_interleave(num_latents)
        # Rows that see no image may attend anywhere (their output is zeroed): avoids all-masked rows.
        mask = (attended[..., None] == latent_image) | ~sees_image
        return cls(sees_image, mask[:, None], None, num_latents)

    def select(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, T_img·n, d) keys and values -> those of the decoding token's image, (B, H, n, d), when decoding."""
        if self.decoding_image is None:
            return key, value
        rows, image = self.decoding_image
        return tuple(x.unflatten(2, (-1, self.num_latents))[rows, :, image] for x in (key, value))


@dataclass
class MediaContext:
    """What the cross-attention blocks need for one forward: the images and which one each token sees."""

    media: MediaCache | None
    attended_image: torch.Tensor  # (B, T_txt) long: 1-based image index per token; 0 = no image yet
    _routing: dict[torch.device, ImageRouting] = field(default_factory=dict, init=False, repr=False)

    def routing(self, device: torch.device) -> ImageRouting:
        if device not in self._routing:  # once per device: the blocks of a sharded model may sit on several
            attended = self.attended_image.to(device)
            self._routing[device] = ImageRouting.of(attended, self.media.num_images, self.media.latents.shape[2])
        return self._routing[device]


_media_context: contextvars.ContextVar[MediaContext | None] = contextvars.ContextVar("flamingo_media", default=None)


@contextlib.contextmanager
def media_context(context: MediaContext) -> Iterator[None]:
    token = _media_context.set(context)
    try:
        yield
    finally:
        _media_context.reset(token)


class MaskedCrossAttention(nn.Module):
    """Text tokens (queries) attend to the latents of one image: the latest `<image>` at or before them."""

    def __init__(self, config: FlamingoConfig, layer_idx: int):
        super().__init__()
        dim, dim_visual = config.text_config.hidden_size, config.vision_config.hidden_size
        heads, dim_head = config.cross_attn_heads, config.cross_attn_dim_head
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.scale, self.is_causal = heads, dim_head**-0.5, False
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def media_keys_values(self, media: MediaCache, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, T_img·n, d) keys and values of the images, projected once per call when possible."""
        if self.layer_idx in media.keys_values:
            return media.keys_values[self.layer_idx]
        # In this block's dtype (its LayerNorm's: never quantized), which may differ from the perceiver's.
        latents = rearrange(media.latents.to(device=device, dtype=self.norm.weight.dtype), "b t n d -> b (t n) d")
        key, value = self.to_kv(latents).chunk(2, dim=-1)
        key, value = (rearrange(x, "b t (h d) -> b h t d", h=self.heads) for x in (key, value))
        if not torch.is_grad_enabled():
            media.keys_values[self.layer_idx] = (key, value)
        return key, value

    def forward(self, hidden_states: torch.Tensor, context: MediaContext) -> torch.Tensor:
        # hidden_states (B, T_txt, D) -> (B, T_txt, D)
        routing = context.routing(hidden_states.device)
        key, value = routing.select(*self.media_keys_values(context.media, hidden_states.device))
        query = rearrange(self.to_q(self.norm(hidden_states)), "b t (h d) -> b h t d", h=self.heads)
        output = attend(self, query, key, value, routing.mask, self.scale) * routing.sees_image
        return self.to_out(output)


class GatedCrossAttentionBlock(GradientCheckpointingLayer):
    """`x + tanh(attn_gate)·xattn(x) `, then `+ tanh(ff_gate)·ff(x)`. Gates start at 0: a new block is the identity."""

    def __init__(self, config: FlamingoConfig, layer_idx: int):
        super().__init__()
        dim = config.text_config.hidden_size
        self.attn = MaskedCrossAttention(config, layer_idx)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward = feed_forward(dim, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states: torch.Tensor, context: MediaContext) -> torch.Tensor:
        # Computed in the block's own dtype, returned in the residual stream's: the block may be kept in fp32 in a
        # bf16/fp16 language model (training the blocks on a frozen LM; `_keep_in_fp32_modules` under fp16).
        stream_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.attn_gate.dtype)
        if context.media is not None:  # text-only input: the attention output is zero, the FF still runs
            hidden_states = self.attn(hidden_states, context) * self.attn_gate.tanh() + hidden_states
        hidden_states = self.feed_forward(hidden_states) * self.ff_gate.tanh() + hidden_states
        return hidden_states.to(stream_dtype)


class FlamingoLayer(nn.Module):
    """A decoder layer of the language model, preceded by an optional gated cross-attention block."""

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_cross_attn_layer = gated_cross_attn_layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = _media_context.get()
        if self.gated_cross_attn_layer is not None and context is not None:
            hidden_states = self.gated_cross_attn_layer(hidden_states, context)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def spliced_name(name: str, layers_prefix: str) -> str:
    """A stock LM's `<layers_prefix><i>.<x>` -> `<layers_prefix><i>.decoder_layer.<x>`, its place inside the
    FlamingoLayer; other names, and names already spliced, pass through."""
    return re.sub(rf"^({re.escape(layers_prefix)}\d+)\.(?!decoder_layer\.|gated_cross_attn_layer\.)", r"\1.decoder_layer.",
                  name)


def find_decoder_layers(language_model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder layers: `path` if given, else the only module list with one entry
    per hidden layer, all of one class (`model.layers`, `transformer.blocks`, `gpt_neox.layers`, ...)."""
    if path is not None:
        return path, language_model.get_submodule(path)
    num_layers = language_model.config.get_text_config().num_hidden_layers
    candidates = [
        (name, module)
        for name, module in language_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len({type(m) for m in module}) == 1
    ]
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise ValueError(
            f"Cannot tell which module list of {type(language_model).__name__} holds its {num_layers} decoder layers "
            f"(candidates: {found}). Pass decoder_layers_attr_name='<dotted path>' in the config, e.g. 'model.layers'."
        )
    return candidates[0]


def splice_cross_attention(language_model: nn.Module, config: FlamingoConfig) -> str:
    """Wrap every decoder layer in a `FlamingoLayer`, with a cross-attention block before layers
    n-1, 2n-1, ... (n = `cross_attn_every_n_layers`). Returns the decoder layers' path."""
    path, layers = find_decoder_layers(language_model, config.decoder_layers_attr_name)
    n = config.cross_attn_every_n_layers
    if not 1 <= n <= len(layers):
        raise ValueError(
            f"cross_attn_every_n_layers={n} puts cross-attention before no decoder layer of "
            f"{type(language_model).__name__}'s {len(layers)} (at {path}); use 1..{len(layers)}"
        )
    for i, layer in enumerate(layers):
        block = GatedCrossAttentionBlock(config, layer_idx=i) if (i + 1) % n == 0 else None
        layers[i] = FlamingoLayer(layer, block)
    return path


# --------------------------------------------------------------------------------------------------
# The training loss at the supervised positions only
# --------------------------------------------------------------------------------------------------
# Language models whose causal-LM forward is `lm_head(get_decoder()(...).last_hidden_state)` and nothing more (no logit
# scaling or soft-capping after the head), so that `supervised_token_loss` on the decoder's output is their loss.
# Their decoder layers' position-wise feed-forward module, by name (see `feed_forward_at`).
DECODER_FEED_FORWARD = {"llama": "mlp", "mistral": "mlp", "qwen2": "mlp", "mpt": "ffn", "gpt_neox": "mlp"}
PLAIN_HEAD_MODEL_TYPES = frozenset(DECODER_FEED_FORWARD)
IGNORE_INDEX = -100
# Rows of logits formed at once: about 32 MiB of float32 logits at a 32k vocabulary.
LOSS_CHUNK_VALUES = 2**23


class SupervisedTokenLoss(torch.autograd.Function):
    """Summed cross-entropy of `linear(hidden, weight, bias)` against `targets`, divided by `denominator`, with the
    gradients formed during the forward pass, a chunk of rows at a time.

    The logits' gradient is `softmax(logits) - onehot(target)`, known as soon as the logits are: forming it at once and
    multiplying it into the input's (and, if the head trains, the head's) gradient leaves nothing of the (rows, vocab)
    logits alive for the backward pass. The products are the ones autograd would do (the head forward, the input's
    gradient, the weight's if it trains), so this costs no extra arithmetic. Logits are upcast to float32 for the
    softmax, as transformers' causal-LM loss does."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                denominator: torch.Tensor) -> torch.Tensor:
        # hidden (K, D): the supervised positions' final hidden states; targets (K,) their next tokens
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_input else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        loss_dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 when checking gradients
        total = hidden.new_zeros((), dtype=loss_dtype)
        chunk = max(1, LOSS_CHUNK_VALUES // weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            rows, wanted = hidden[start : start + chunk], targets[start : start + chunk, None]
            logits = nn.functional.linear(rows, weight, bias).to(loss_dtype)
            log_norm = logits.logsumexp(dim=-1, keepdim=True)
            total += (log_norm - logits.gather(1, wanted)).sum()
            if not (need_input or need_weight or need_bias):
                continue
            grad_logits = logits.sub_(log_norm).exp_().scatter_add_(1, wanted, logits.new_full(wanted.shape, -1.0))
            grad_logits = grad_logits.to(weight.dtype)
            if need_input:
                grad_hidden[start : start + chunk] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, rows.to(weight.dtype))
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        *grads, denominator = ctx.saved_tensors
        scale = grad_loss / denominator
        return *(None if grad is None else grad * scale.to(grad.dtype) for grad in grads), None, None


def supervised_positions(labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·T,) next-token targets of the flattened positions (-100 where none is supervised), and (K,) the indices of
    the K supervised ones. A host sync: K is only known on the host afterwards."""
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten().to(device)
    return targets, (targets != IGNORE_INDEX).nonzero().squeeze(1)


def supervised_token_loss(hidden_states: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                          num_items_in_batch: torch.Tensor | int | None = None,
                          positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """transformers' causal-LM loss of `head(hidden_states)` against `labels` (shifted here: position t predicts
    labels[t + 1]; -100 is ignored), computing the head only at the positions whose next label is supervised. The
    mean over those positions, or their sum divided by `num_items_in_batch` when given (gradient accumulation).
    `positions`: `supervised_positions(labels)`, if the caller has them already."""
    targets, rows = (x.to(hidden_states.device) for x in positions or supervised_positions(labels, hidden_states.device))
    selected = hidden_states.flatten(0, 1).index_select(0, rows)
    if num_items_in_batch is None:
        denominator = torch.tensor(float(rows.numel()), device=hidden_states.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden_states.device)
    return SupervisedTokenLoss.apply(selected, head.weight, head.bias, targets.index_select(0, rows), denominator)


@contextlib.contextmanager
def feed_forward_at(module: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, `module` (a position-wise feed-forward, called with (B, T, ·) tensors) runs at the flattened
    positions `rows` only and outputs zeros at the others.

    In the last decoder layer a position's feed-forward output reaches nothing but that position's final hidden
    state, so a loss-only forward needs it at the supervised positions alone: with Otter's labels (the answers, about
    a quarter of the tokens) that skips most of the layer's largest products, forward and backward. The hidden states
    it leaves at the other positions are not the model's."""
    own_forward = module.__dict__.get("forward")  # a hook's wrapper (accelerate's), kept and called
    forward = module.forward

    def at_rows(*args: torch.Tensor) -> torch.Tensor:
        batch, length = args[0].shape[:2]
        index = rows.to(args[0].device)
        output = forward(*(x.flatten(0, 1).index_select(0, index)[None] for x in args))[0]  # (K, D)
        return output.new_zeros(batch * length, output.shape[-1]).index_copy(0, index, output).unflatten(0, (batch, length))

    module.forward = at_rows
    try:
        yield
    finally:
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def register_published_layout(model_type: str) -> None:
    """Read and write CLIP as the published checkpoints store it (`vision_encoder.vision_model.*`):
    transformers 5 flattened `CLIPVisionModel`, so its keys are renamed on load and back on save."""
    renaming = WeightRenaming(r"^vision_encoder\.vision_model\.", "vision_encoder.")
    register_checkpoint_conversion_mapping(model_type, [renaming], overwrite=True)


def _train_only_rows(weight: nn.Parameter, rows: list[int]) -> torch.utils.hooks.RemovableHandle:
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    keep[rows] = True
    return weight.register_hook(lambda grad: grad * keep.to(grad.device))


def as_vision_x(vision_x: torch.Tensor | None, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """The images as `vision_x`, also when given as `pixel_values`, transformers' usual name: `(B, 3, H, W)` is one
    image per row, 6-D is `vision_x`'s own layout."""
    if pixel_values is None:
        return vision_x
    if vision_x is not None:
        raise ValueError("got both vision_x and pixel_values; pass the images once (pixel_values is an alias of vision_x)")
    if pixel_values.ndim == 4:
        return pixel_values[:, None, None]
    if pixel_values.ndim == 6:
        return pixel_values
    raise ValueError(
        f"pixel_values must be (batch, channels, height, width), one image per row, or (batch, images, frames, "
        f"channels, height, width) as vision_x; got shape {tuple(pixel_values.shape)}"
    )


def _check_vision_x(vision_x: torch.Tensor) -> None:
    if not isinstance(vision_x, torch.Tensor):
        raise TypeError(f"vision_x must be a torch tensor (the processor's output), got {type(vision_x).__name__}")
    if vision_x.ndim != 6:
        raise ValueError(f"vision_x must be (batch, images, frames, channels, height, width); got shape {tuple(vision_x.shape)}")
    if not vision_x.is_floating_point():
        # Raw 0-255 pixels would be cast to float as they are, never normalized: a silently wrong image.
        raise TypeError(f"vision_x is {vision_x.dtype}; pass normalized float pixel values, as the processor makes them")


def _check_shapes(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    image_rows: int | None,
    attended_image: torch.Tensor | None,
    labels: torch.Tensor | None = None,
) -> None:
    """Shape-only checks (no host sync, so also cheap at every decoding step): one text row per image row, never
    broadcast, and 2-D integer token ids."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids (or inputs_embeds with attended_image)")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor of token ids (batch, tokens); got {shape}"
                             + (f" {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (shape (batch, 0))")
    rows = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
    if image_rows is not None and image_rows != rows:
        raise ValueError(
            f"input_ids has {rows} rows but the images have {image_rows} (vision_x / media_cache batch); "
            "each text row needs its own row of images"
        )
    for name, tensor in (("attention_mask", attention_mask), ("attended_image", attended_image), ("labels", labels)):
        if tensor is not None and tensor.shape[0] != rows:
            raise ValueError(f"{name} has {tensor.shape[0]} rows but input_ids has {rows}")
    if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected input_ids' {tuple(input_ids.shape)}")


def _check_image_count(counts: list[int], num_images: int, media_token_id: int) -> None:
    """`counts`: `<image>` tokens per row. Every `<image>` needs an image; every image slot must be used by at least
    one row (rows with fewer images than slots have zero padding there)."""
    for row, count in enumerate(counts):
        if count > num_images:
            hint = " (no images were given: pass vision_x or media_cache)" if num_images == 0 else ""
            raise ValueError(
                f"row {row} of input_ids has {count} <image> tokens (id {media_token_id}) "
                f"but vision_x holds {num_images} images per row{hint}"
            )
    if max(counts) < num_images:
        where = f"row 0 has {counts[0]}" if len(counts) == 1 else f"no row has more than {max(counts)}"
        raise ValueError(f"vision_x holds {num_images} images per row but {where} <image> tokens")


def _image_rows(vision_x: torch.Tensor | None, media_cache: MediaCache | None) -> int | None:
    if vision_x is not None:
        return vision_x.shape[0]
    return media_cache.latents.shape[0] if media_cache is not None else None


def _num_images(vision_x: torch.Tensor | None, media_cache: MediaCache | None) -> int:
    if vision_x is not None:
        return vision_x.shape[1]
    return media_cache.num_images if media_cache is not None else 0


@dataclass
class FlamingoCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the encoded images, to pass back as `media_cache` for more tokens."""

    media_cache: MediaCache | None = None


class FlamingoPreTrainedModel(PreTrainedModel):
    config: FlamingoConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoLayer", "PerceiverBlock"]
    # Not quantized by default: transformers' quantizers (bnb 8/4-bit, torchao, quanto, ...) add this list to their
    # skip list, so `BitsAndBytesConfig(load_in_8bit=True)` alone converts only the language model's decoder layers
    # (its lm_head is kept by transformers' own default). These are the frozen vision tower and the parts Otter and
    # OpenFlamingo train. Patterns match from the start of a module or parameter name. Side effect: a load with
    # dtype=torch.float16 keeps these modules in fp32 (bf16 loads are unaffected).
    _keep_in_fp32_modules = FP32_MODULES
    _supports_sdpa = True
    _supports_flash_attn = True
    # Buffers that older transformers saved (LLaMA's rotary `inv_freq`, CLIP's `position_ids`), and the
    # frame embeddings some image-only checkpoints carry: present in published files, unused here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$", r"\.position_ids$", r"^perceiver\.frame_embs$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A missing local folder or a truncated shard otherwise fails with messages naming neither.
        if pretrained_model_name_or_path is not None:
            check_local_model(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: bool = True, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus what makes the folder portable (see `flamingo.hub`): `auto_map` and
        the model's code, so that transformers alone loads it with `trust_remote_code=True`, and a model card
        (README.md) unless `model_card=False` or the folder has a README.md of its own."""
        model_class = exportable_class(type(self), FlamingoPreTrainedModel)
        self.config.auto_map = model_auto_map(model_class)
        super().save_pretrained(save_directory, **kwargs)
        if not self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            return
        export_code(save_directory, [type(self.config), model_class])
        if model_card and not has_own_model_card(save_directory):
            write_model_card(save_directory, base_models=[self.config.name_or_path])

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, PerceiverResampler):
            init.normal_(module.latents, std=1.0)
            if module.frame_embs is not None:
                init.normal_(module.frame_embs, std=1.0)


class FlamingoModel(FlamingoPreTrainedModel, GenerationMixin):
    """Flamingo with a language-modelling head: `forward` gives logits (and a loss with `labels`),
    `generate` continues interleaved image/text prompts."""

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.vision_encoder = AutoModel.from_config(config.vision_config)
        self.perceiver = PerceiverResampler(config)
        self.lang_encoder = AutoModelForCausalLM.from_config(config.text_config)
        self.decoder_layers_path = splice_cross_attention(self.lang_encoder, config)
        self._row_gradient_masks: list[torch.utils.hooks.RemovableHandle] = []
        self.post_init()
        self.generation_config.eos_token_id = config.endofchunk_token_id

    def get_input_embeddings(self) -> nn.Module:
        return self.lang_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lang_encoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lang_encoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lang_encoder.set_output_embeddings(value)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.lang_encoder.get_submodule(self.decoder_layers_path)

    def language_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The language model's own weights under the stock model's names (`model.layers.0.self_attn...`), without
        the cross-attention blocks: what `AutoModelForCausalLM.from_config(config.text_config)` loads."""
        return {name.replace(".decoder_layer.", ".", 1): tensor for name, tensor in self.lang_encoder.state_dict().items()
                if ".gated_cross_attn_layer." not in name}

    def load_language_model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the language model from a pretrained stock model's weights (`language_model_state_dict`'s names),
        as OpenFlamingo builds on a pretrained LM; the cross-attention blocks keep theirs. Every weight of the
        language model must be given, with its shape, and nothing else; otherwise nothing is loaded."""
        given = {spliced_name(name, f"{self.decoder_layers_path}."): tensor for name, tensor in state_dict.items()}
        own = {name: tensor for name, tensor in self.lang_encoder.state_dict().items()
               if ".gated_cross_attn_layer." not in name}
        missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"the language model weights do not fit {self.config.text_config.model_type!r} of "
                             f"this config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in given.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"the language model weight {name} has shape {tuple(tensor.shape)}; this config's "
                                 f"language model needs {tuple(own[name].shape)}")
        self.lang_encoder.load_state_dict(given, strict=False)

    # ---- training ----------------------------------------------------------------------------------
    def set_trainable(self, *, vision_encoder: bool = False, language_model: bool = False, new_token_rows: bool = True) -> None:
        """Choose what trains. The default is Otter's recipe: the perceiver and the gated cross-attention
        blocks train; the vision encoder and the language model stay frozen, except the input (and untied
        output) embedding rows of the added tokens (`<image>`, `<|endofchunk|>`, Otter's `<answer>`), whose
        other rows get zero gradient. Keep those embeddings out of weight decay, or the frozen rows decay."""
        for handle in self._row_gradient_masks:
            handle.remove()
        self._row_gradient_masks = []
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for layer in self.decoder_layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.requires_grad_(True)
        self.vision_encoder.requires_grad_(vision_encoder)
        self.vision_encoder.post_layernorm.requires_grad_(False)  # only pools CLS, which the features omit
        if language_model:
            self.lang_encoder.requires_grad_(True)
        elif new_token_rows:
            rows = sorted({getattr(self.config, field) for field in self.config.token_id_fields})
            for embedding in {self.get_input_embeddings(), self.get_output_embeddings()} - {None}:
                self._row_gradient_masks.append(_train_only_rows(embedding.weight, rows))

    # ---- images ------------------------------------------------------------------------------------
    def encode_images(self, vision_x: torch.Tensor) -> MediaCache:
        """(B, T_img, F, C, H, W) pixels -> perceiver latents (B, T_img, n_latents, D_v)."""
        _check_vision_x(vision_x)
        batch, num_images, num_frames = vision_x.shape[:3]
        pixels = rearrange(vision_x, "b t f c h w -> (b t f) c h w").to(self.vision_encoder.dtype)
        # A frozen tower runs without autograd's bookkeeping: nothing in it can take a gradient.
        frozen = not pixels.requires_grad and not any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            # Patch tokens without CLS and before post_layernorm, as OpenFlamingo and Otter were trained.
            patches = self.vision_encoder(pixel_values=pixels).last_hidden_state[:, 1:]
        latents = self.perceiver(rearrange(patches, "(n f) v d -> n f v d", f=num_frames))
        return MediaCache(rearrange(latents, "(b t) n d -> b t n d", b=batch))

    def attended_images(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T): the 1-based index of the image each token cross-attends to, 0 for none.
        Inclusive: an `<image>` token sees its own image."""
        is_media = input_ids == self.config.media_token_id
        attended = is_media.cumsum(dim=-1)
        if not self._attend_previous():
            attended = attended + (~is_media).long()  # text attends to the next image
        return attended

    def _attend_previous(self) -> bool:
        if self.config.only_attend_previous:
            return True
        if self.config.use_media_placement_augmentation and self.training:
            return bool(torch.rand(()) < 0.5)
        return False

    def _check_prompt(self, input_ids: torch.Tensor, vision_x: torch.Tensor | None, media_cache: MediaCache | None) -> None:
        """Checks of a whole prompt, made once (by `forward` without `attended_image`, and by `generate` before its
        first step) with a single host sync: token ids inside the vocabulary, no more positions than the language
        model has, finite pixels, and images matching the `<image>` tokens (see `_check_image_count`)."""
        length, limit = input_ids.shape[1], self.config.context_length
        if limit is not None and length > limit:
            raise ValueError(
                f"input_ids has {length} tokens, more than the language model's {limit} positions "
                f"(text_config max_position_embeddings / max_seq_len); shorten the prompt"
            )
        num_images = _num_images(vision_x, media_cache)
        media_per_row = (input_ids == self.config.media_token_id).sum(dim=-1)
        # NaN or infinite pixels would turn every logit that sees the image into NaN, without an error.
        finite = torch.isfinite(vision_x).all().to(input_ids.device) if vision_x is not None else input_ids.new_ones(())
        low, high, all_finite, *counts = torch.cat([torch.stack([*input_ids.aminmax(), finite.long()]), media_per_row]).tolist()
        vocab = self.config.text_config.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids holds token id {low if low < 0 else high}, outside the vocabulary 0..{vocab - 1}")
        if not all_finite:
            raise ValueError("vision_x holds NaN or infinite values; pass finite pixel values, as the processor makes them")
        _check_image_count(counts, num_images, self.config.media_token_id)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        vision_x: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        media_cache: MediaCache | None = None,
        attended_image: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.FloatTensor | None = None,
        loss_only: bool = False,
        **kwargs,
    ) -> FlamingoCausalLMOutput:
        r"""
        input_ids (B, T): text with one `<image>` token per image.
        vision_x (B, T_img, F, C, H, W): the images of each row in order (F frames each); rows with fewer
            images are zero-padded.
        media_cache: images already encoded by an earlier call (`output.media_cache`), instead of vision_x.
        attended_image (B, T): the image each position attends to (see `attended_images`); needed with
            `inputs_embeds` or when `input_ids` continue a cached prefix that holds the `<image>` tokens.
        pixel_values: an alias of vision_x; `(B, C, H, W)` for one image per row (see `as_vision_x`).
        loss_only: with `labels`, for training: compute the language model's head only at the positions whose next
            label is supervised (not -100), and its gradients during the forward pass (`supervised_token_loss`), so
            that no (B, T, vocab) logits tensor is made or kept for the backward pass. The loss and gradients are
            those of the full computation (up to float rounding); `logits` is then None. Language models outside
            `PLAIN_HEAD_MODEL_TYPES`, or a head that is not a plain `nn.Linear` (quantized, sharded by ZeRO-3), take
            the full computation, also returning `logits=None`.
        Other arguments are the language model's.
        """
        vision_x = as_vision_x(vision_x, pixel_values)
        if vision_x is not None and media_cache is not None:
            raise ValueError("pass either vision_x or media_cache, not both")
        if vision_x is not None:
            _check_vision_x(vision_x)
        _check_shapes(input_ids, inputs_embeds, attention_mask, _image_rows(vision_x, media_cache), attended_image, labels)
        if attended_image is None:
            if input_ids is None:
                raise ValueError("with inputs_embeds, pass attended_image (see FlamingoModel.attended_images)")
            self._check_prompt(input_ids, vision_x, media_cache)
            attended_image = self.attended_images(input_ids)
        if vision_x is not None:
            media_cache = self.encode_images(vision_x)

        if loss_only and labels is None:
            raise ValueError("loss_only=True computes the loss alone; pass labels too")
        lm_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "inputs_embeds": inputs_embeds,
                     "use_cache": use_cache, **({"position_ids": position_ids} if position_ids is not None else {}), **kwargs}
        with media_context(MediaContext(media_cache, attended_image)):
            if loss_only and self._supervised_loss_applies():
                outputs = self._supervised_loss_forward(labels, lm_inputs)
            else:
                outputs = self.lang_encoder(labels=labels, logits_to_keep=logits_to_keep, **lm_inputs)
        return FlamingoCausalLMOutput(
            loss=outputs.loss,
            logits=None if loss_only else outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            media_cache=media_cache,
        )

    def _supervised_loss_applies(self) -> bool:
        head, model_type = self.get_output_embeddings(), self.lang_encoder.config.model_type
        # ZeRO-3 keeps an empty placeholder in `head.weight` outside the head's own forward call.
        applies = model_type in PLAIN_HEAD_MODEL_TYPES and type(head) is nn.Linear and not hasattr(head.weight, "ds_id")
        if not applies:
            logger.warning_once(f"loss_only: the {model_type} language model's head ({type(head).__name__}) takes the "
                                "full logits computation (the supervised-positions loss covers plain heads of "
                                f"{', '.join(sorted(PLAIN_HEAD_MODEL_TYPES))})")
        return applies

    def _supervised_loss_forward(self, labels: torch.Tensor, lm_inputs: dict) -> CausalLMOutputWithPast:
        """The language model's decoder, then `supervised_token_loss` on its output: the causal LM's forward for
        the models of `PLAIN_HEAD_MODEL_TYPES`, whose head is applied to the decoder's output and nothing else."""
        num_items_in_batch = lm_inputs.pop("num_items_in_batch", None)
        head = self.get_output_embeddings()
        positions = supervised_positions(labels, head.weight.device)
        last_layer = self.decoder_layers[-1].decoder_layer
        feed_forward = last_layer.get_submodule(DECODER_FEED_FORWARD[self.lang_encoder.config.model_type])
        # Gradient checkpointing runs the layer again in the backward pass, outside this call: there, all positions.
        every_position = self.lang_encoder.is_gradient_checkpointing or lm_inputs.get("output_hidden_states")
        with contextlib.nullcontext() if every_position else feed_forward_at(feed_forward, positions[1]):
            outputs = self.lang_encoder.get_decoder()(**lm_inputs)
        loss = supervised_token_loss(outputs.last_hidden_state, head, labels, num_items_in_batch, positions)
        return CausalLMOutputWithPast(loss=loss, cache=getattr(outputs, "cache", None),
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *args, **kwargs):
        """`GenerationMixin.generate`, after checking the prompt once: decoding steps pass `attended_image`, which
        skips `forward`'s prompt checks, and checking every step would cost a host sync per token."""
        if "pixel_values" in kwargs:  # transformers' usual name; the generation steps only know vision_x
            kwargs["vision_x"] = as_vision_x(kwargs.get("vision_x"), kwargs.pop("pixel_values"))
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            vision_x = kwargs.get("vision_x")
            media_cache = kwargs.get("media_cache")
            if vision_x is not None:
                _check_vision_x(vision_x)
            _check_shapes(input_ids, None, kwargs.get("attention_mask"), _image_rows(vision_x, media_cache), None)
            self._check_prompt(input_ids, vision_x, media_cache)
            self._check_generation_length(input_ids.shape[1], generation_config or self.generation_config, kwargs)
        return super().generate(inputs, generation_config, *args, **kwargs)

    def _check_generation_length(self, prompt_length: int, generation_config, kwargs: dict) -> None:
        """Refuse a generation that would run past the language model's positions (beyond them, learned position
        tables fail and rotary ones give unreliable text)."""
        limit = self.config.context_length
        max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        # Without max_new_tokens only an explicit max_length counts: the default one (20) is not the user's request.
        total = prompt_length + max_new_tokens if max_new_tokens is not None else kwargs.get("max_length")
        if limit is not None and total is not None and total > limit:
            raise ValueError(
                f"a {prompt_length}-token prompt generating up to {total} tokens exceeds the language model's {limit} "
                f"positions; ask for at most {max(limit - prompt_length, 0)} new tokens or shorten the prompt"
            )

    def prepare_inputs_for_generation(
        self, input_ids, vision_x=None, media_cache=None, attended_image=None, **kwargs
    ) -> dict:
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # Which image a new token sees follows from the whole sequence so far, not just the new tokens.
        step_length = model_inputs["input_ids"].shape[1]
        model_inputs["attended_image"] = self.attended_images(input_ids)[:, -step_length:]
        if media_cache is not None:
            model_inputs["media_cache"] = media_cache  # encoded at the first step, reused after
        else:
            model_inputs["vision_x"] = vision_x
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        # Beam search and num_return_sequences copy every input once per sequence: encode the images first, then copy
        # their latents, rather than running the vision tower and perceiver on each copy.
        # A media_cache passed in (images encoded beforehand, e.g. by flamingo.eval) is copied the same way.
        vision_x = model_kwargs.pop("vision_x", None) if expand_size > 1 else None
        given = model_kwargs.pop("media_cache", None) if expand_size > 1 else None
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if vision_x is not None or given is not None:
            latents = self.encode_images(vision_x).latents if vision_x is not None else given.latents
            model_kwargs["media_cache"] = MediaCache(latents.repeat_interleave(expand_size, dim=0))
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["media_cache"] = outputs.media_cache
        return model_kwargs


register_published_layout(FlamingoConfig.model_type)

__all__ = ["FlamingoModel", "FlamingoPreTrainedModel", "MediaCache", "register_published_layout"]
