"""Per-GPU memory of a Flamingo/Otter model for inference or training, planned without the GPUs.

    flamingo-memory otter-9b-llama --gpus 4x24GB --mode training --strategy device_map --batch 4

Parameter counts come from the real modules built on the meta device (`flamingo.planning.meta_model`); the trainable
subset from the model's own `set_trainable` (as `otter-train` calls it); per-GPU weights under `device_map` from
`flamingo.planning.plan_device_map`. Gradients, AdamW state and activations follow the explicit formulas below;
docs/memory.md states every assumption and the errors of the activation model against saved-tensor measurements.

Activation model (bytes saved for backward; `s` = bytes per element of the compute dtype, `t` = text tokens B·T,
`h`/`i`/`n_h`/`d_head` the LM's hidden size, intermediate size, heads and head size):

* LLaMA-style decoder layer: `t·(s·(10h + 4i) + 4·n_h)` when its weights train; `t·(s·(6h + 3i) + 4·n_h)` when
  they are frozen but gradients flow through it (Otter's recipe: no inputs kept for weight gradients); plus once
  per forward the rotary cos/sin, `2·t·d_head·s`.
* gated cross-attention block: `t·s·(14h + 3·d_x) + 2·t·Tk·s` and the keys/values of the images
  `2·B·Tk·d_x·s`, with `d_x` = heads·dim_head, `Tk` = images·latents.
* perceiver block, per image: `s·(v·D + (v+l)·D + 2·(v+l)·d_p + l·(12·D + 3·d_p))` (`v` patches, times the
  frames of a video clip, `l` latents), plus once the perceiver's input and output, `s·(v + l)·D` per image.
* vision encoder layer (only when it trains), per patch token of every frame: `s·(9·D + 3·I)`.

A video clip is one image of `F` frames (`--frames`): the vision tower and the perceiver's media grow `F` times, the
cross-attention does not (each clip is `l` latents, as an image is).
* loss: fp32 log-probabilities `4·t·V`, the final norm and lm_head inputs `2·s·t·h`.

With gradient checkpointing only each checkpointed layer's input is kept (`s·t·h` per decoder layer and per
cross-attention block, `s·l·D` per perceiver block and image) plus, during backward, one layer's full activations
(the largest). Inference keeps no saved tensors: its peak is one layer's transient working set, the KV cache and
the logits of one position.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import recipes
from .arguments import parse_gpus
from .planning import GiB, meta_model, plan_device_map, resolve_device

CUDA_CONTEXT = int(0.5 * GiB)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRATEGIES = ("single", "device_map", "ddp", "fsdp", "zero2", "zero3")
PARTS = ("vision_encoder", "perceiver", "cross_attention", "lm_decoder", "embeddings_head")


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
def part_of(name: str) -> str:
    """Which of PARTS a parameter name belongs to."""
    if name.startswith("vision_encoder."):
        return "vision_encoder"
    if name.startswith("perceiver."):
        return "perceiver"
    if ".gated_cross_attn_layer." in name:
        return "cross_attention"
    if ".decoder_layer." in name:
        return "lm_decoder"
    return "embeddings_head"


@dataclass
class ParameterCounts:
    total: dict[str, int]
    trainable: dict[str, int]
    lora: int = 0

    @property
    def total_sum(self) -> int:
        return sum(self.total.values())

    @property
    def trainable_sum(self) -> int:
        return sum(self.trainable.values()) + self.lora


def count_parameters(model: nn.Module, trainable: str = "otter") -> ParameterCounts:
    """Total and trainable parameters per part, with the training recipes' sets (`flamingo.recipes`)."""
    recipes.freeze_for(model, trainable)
    total, train = defaultdict(int), defaultdict(int)
    for name, parameter in model.named_parameters():
        total[part_of(name)] += parameter.numel()
        if parameter.requires_grad:
            train[part_of(name)] += parameter.numel()
    lora = recipes.lora_parameter_count(model) if trainable == "lora" else 0
    return ParameterCounts({p: total[p] for p in PARTS}, {p: train[p] for p in PARTS}, lora)


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    """The sizes the activation formulas need, read from a FlamingoConfig."""

    h: int
    i: int
    heads: int
    head_dim: int
    layers: int
    vocab: int
    xattn_blocks: int
    d_x: int
    x_heads: int
    D: int
    I: int
    v_layers: int
    patches: int
    latents: int
    p_depth: int
    d_p: int

    @classmethod
    def of(cls, config) -> Shapes:
        t, v = config.text_config, config.vision_config
        heads = t.num_attention_heads
        return cls(
            h=t.hidden_size, i=getattr(t, "intermediate_size", None) or 4 * t.hidden_size, heads=heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, layers=t.num_hidden_layers,
            vocab=t.vocab_size, xattn_blocks=t.num_hidden_layers // config.cross_attn_every_n_layers,
            d_x=config.cross_attn_heads * config.cross_attn_dim_head, x_heads=config.cross_attn_heads,
            D=v.hidden_size, I=v.intermediate_size, v_layers=v.num_hidden_layers,
            patches=(v.image_size // v.patch_size) ** 2, latents=config.perceiver_num_latents,
            p_depth=config.perceiver_depth, d_p=config.perceiver_heads * config.perceiver_dim_head,
        )


@dataclass
class ActivationParts:
    """Bytes saved for backward, per component (the whole model, one process's batch)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def decoder_layer_bytes(sh: Shapes, tokens: int, s: int, lm_trains: bool) -> int:
    per_token = s * (10 * sh.h + 4 * sh.i) if lm_trains else s * (6 * sh.h + 3 * sh.i)
    return tokens * (per_token + 4 * sh.heads)


def xattn_block_bytes(sh: Shapes, batch: int, seq: int, images: int, s: int) -> int:
    tokens, keys = batch * seq, images * sh.latents
    return tokens * s * (14 * sh.h + 3 * sh.d_x) + tokens * keys * 2 * s + batch * 2 * keys * sh.d_x * s


def perceiver_block_bytes(sh: Shapes, n_images: int, s: int, frames: int = 1) -> int:
    v, l, D, d = sh.patches * frames, sh.latents, sh.D, sh.d_p
    return n_images * s * (v * D + (v + l) * D + 2 * (v + l) * d + l * (12 * D + 3 * d))


def vision_layer_bytes(sh: Shapes, n_frames: int, s: int) -> int:
    return n_frames * (sh.patches + 1) * s * (9 * sh.D + 3 * sh.I)


def activation_bytes(
    config, batch: int, seq: int, images: int, dtype: torch.dtype = torch.float32, trainable: str = "otter",
    checkpointing: bool = False, frames: int = 1,
) -> ActivationParts:
    """The activation model: bytes saved for backward by one training step on `batch` samples of `seq` tokens and
    `images` images (or clips of `frames` frames) each (see the module docstring for the formulas)."""
    sh, s = Shapes.of(config), torch.finfo(dtype).bits // 8
    tokens, n_images = batch * seq, batch * images
    n_frames = n_images * frames
    lm_trains, vision_trains = trainable == "all", trainable == "all"
    layer = decoder_layer_bytes(sh, tokens, s, lm_trains or trainable == "lora")
    block = xattn_block_bytes(sh, batch, seq, images, s)
    p_block = perceiver_block_bytes(sh, n_images, s, frames)
    v_layer = vision_layer_bytes(sh, n_frames, s) if vision_trains else 0
    rotary = 2 * tokens * sh.head_dim * s
    loss = 4 * tokens * sh.vocab + 2 * s * tokens * sh.h  # fp32 log-probs; final norm and lm_head inputs
    latents_once = n_images * sh.latents * sh.D * s + n_frames * sh.patches * sh.D * s  # shared inputs
    if not checkpointing:
        return ActivationParts({
            "vision_encoder": sh.v_layers * v_layer,
            "perceiver": sh.p_depth * p_block + latents_once,
            "cross_attention": sh.xattn_blocks * block,
            "lm_decoder": sh.layers * layer + rotary,
            "embeddings_head": loss,
        })
    recompute = max(layer, block, p_block, v_layer)
    return ActivationParts({
        "vision_encoder": sh.v_layers * n_frames * (sh.patches + 1) * sh.D * s if vision_trains else 0,
        "perceiver": sh.p_depth * n_images * sh.latents * sh.D * s + latents_once,
        "cross_attention": sh.xattn_blocks * tokens * sh.h * s,
        "lm_decoder": sh.layers * tokens * sh.h * s + rotary,
        "embeddings_head": loss,
        "recompute": recompute,
    })


def inference_bytes(config, batch: int, seq: int, images: int, dtype: torch.dtype, frames: int = 1) -> int:
    """Peak transient memory of a forward without grad: one layer's working set, the KV cache of a
    generation of `seq` tokens, the image keys/values of each block, the vision tower's working set over every
    frame and the last position's logits in fp32."""
    sh, s = Shapes.of(config), torch.finfo(dtype).bits // 8
    tokens = batch * seq
    working = tokens * s * (4 * sh.h + 3 * sh.i) + batch * sh.heads * seq * seq * s
    kv_cache = 2 * sh.layers * tokens * sh.heads * sh.head_dim * s
    media_kv = sh.xattn_blocks * 2 * batch * images * sh.latents * sh.d_x * s
    vision = batch * images * frames * (sh.patches + 1) * s * (4 * sh.D + sh.I)
    return working + kv_cache + media_kv + max(vision, 0) + 4 * batch * sh.vocab * 2


# ------------------------------------------------------------------------------------------------
# Measurement (the check of the activation model)
# ------------------------------------------------------------------------------------------------
def measure_saved_bytes(
    model: nn.Module, batch: int, seq: int, images: int, checkpointing: bool = False, frames: int = 1
) -> int:
    """Bytes of the tensors autograd saves for backward in one training step (forward + backward), each storage
    once and parameters excluded. With gradient checkpointing: the tensors saved during the forward plus the
    largest set recomputed for one layer during the backward (the peak the activation model predicts)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = model.config
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.activation_checkpointing_disable()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(500, config.text_config.vocab_size), (batch, seq), generator=generator)
    ids[ids == config.media_token_id] = 3
    for k in range(images):
        ids[:, k * (seq // images)] = config.media_token_id
    size = config.vision_config.image_size
    vision_x = torch.randn(batch, images, frames, 3, size, size, generator=generator)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"backward": False, "current": 0, "peak": 0, "seen": set()}
    forward_saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            if state["backward"]:
                if storage.data_ptr() in state["seen"]:
                    return tensor
                state["seen"].add(storage.data_ptr())
                state["current"] += storage.nbytes()
                state["peak"] = max(state["peak"], state["current"])
            else:
                forward_saved[storage.data_ptr()] = max(forward_saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    def restart(owner: str):
        def hook(module, args):  # a submodule of a checkpointed layer runs: in the backward, its recompute
            if state["backward"] and state.get("layer") != owner:
                state["layer"], state["current"], state["seen"] = owner, 0, set()
        return hook

    handles = [
        submodule.register_forward_pre_hook(restart(name))
        for name, layer in model.named_modules()
        if isinstance(layer, GradientCheckpointingLayer)
        for submodule in layer.modules()
        if submodule is not layer
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, vision_x=vision_x, labels=ids, use_cache=False).loss
            state["backward"] = True
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.activation_checkpointing_disable()
        if checkpointing:
            model.disable_input_require_grads()  # gradient_checkpointing_enable hooked the input embeddings
        model.zero_grad(set_to_none=True)
    return sum(forward_saved.values()) + state["peak"]


# ------------------------------------------------------------------------------------------------
# Per-GPU plan
# ------------------------------------------------------------------------------------------------
@dataclass
class GpuMemory:
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    overhead: int = CUDA_CONTEXT

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


@dataclass
class MemoryPlan:
    gpus: list[GpuMemory]
    capacity: int
    margin: float
    counts: ParameterCounts
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(gpu.total <= self.capacity * (1 - self.margin) for gpu in self.gpus)

    def table(self) -> str:
        header = ("GPU", "weights", "grads", "optim", "activ", "overhead", "total")
        rows = [f"{header[0]:>4} " + " ".join(f"{name:>9}" for name in header[1:]) + f" {'of':>8}"]
        for index, gpu in enumerate(self.gpus):
            values = [gpu.weights, gpu.gradients, gpu.optimizer, gpu.activations, gpu.overhead, gpu.total]
            rows.append(f"{index:>4} " + " ".join(f"{v / GiB:9.2f}" for v in values) + f" {self.capacity / GiB:8.1f}")
        rows.append(f"sum  {sum(g.total for g in self.gpus) / GiB:.2f} GiB over {len(self.gpus)} GPU(s) (all in GiB)")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        limit = self.capacity * (1 - self.margin) / GiB
        rows.append(f"{verdict} with a {self.margin:.0%} margin (each GPU at most {limit:.2f} GiB)")
        return "\n".join(rows)


def _param_bytes(name: str, parameter: torch.Tensor, dtype: torch.dtype, int8: bool) -> int:
    keep_fp32 = dtype == torch.float16 and part_of(name) in ("vision_encoder", "perceiver", "cross_attention")
    if int8 and part_of(name) == "lm_decoder" and parameter.ndim == 2:
        return parameter.numel()  # bnb int8: 1 byte, plus negligible per-row scales
    return parameter.numel() * (4 if keep_fp32 else parameter.element_size())


def plan_memory(
    config, gpus: str = "1x80GB", mode: str = "training", dtype: str = "bf16", batch: int = 1, seq: int = 512,
    images: int = 1, strategy: str = "single", trainable: str = "otter", checkpointing: bool = False,
    int8: bool = False, margin: float = 0.1, frames: int = 1,
) -> MemoryPlan:
    """Per-GPU memory (see docs/memory.md for the assumptions). `batch` is per process: the whole batch for
    single/device_map (one process), each GPU's batch for ddp/fsdp/zero2/zero3. `frames` per image: video clips
    (at most the model's `max_num_frames`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    for name, value, least in (("batch", batch, 1), ("seq", seq, 1), ("images", images, 0), ("frames", frames, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    check_frames(config, frames)
    if not 0 <= margin < 1:
        raise ValueError(f"margin is the fraction of each GPU kept free: 0 <= margin < 1, got {margin}")
    count, capacity = parse_gpus(gpus)
    if strategy == "single" and count != 1:
        raise ValueError("strategy single needs exactly one GPU (1xNGB)")
    torch_dtype = DTYPES[dtype]
    model = meta_model(config, torch_dtype)
    counts = count_parameters(model, trainable)
    training = mode == "training"
    notes = []
    # bytes per trainable parameter beyond its weight: gradient in the parameter's dtype; AdamW's two fp32 states,
    # plus an fp32 master copy when the parameter is held in 16 bits (mixed precision)
    named = list(model.named_parameters())
    weight_bytes = {n: _param_bytes(n, p, torch_dtype, int8) for n, p in named}
    grad_bytes = {n: (weight_bytes[n] if p.requires_grad and training else 0) for n, p in named}
    optim_bytes = {
        n: (p.numel() * (8 + (4 if weight_bytes[n] < 4 * p.numel() else 0)) if p.requires_grad and training else 0)
        for n, p in named
    }
    lora = counts.lora if training else 0
    lora_w, lora_g, lora_o = lora * 4, lora * 4, lora * 8  # peft creates adapters in fp32
    act_dtype = torch_dtype
    if training:
        acts = activation_bytes(config, batch, seq, images, act_dtype, trainable, checkpointing, frames).parts
    else:
        acts = {"lm_decoder": inference_bytes(config, batch, seq, images, act_dtype, frames)}
    act_total = sum(acts.values())
    W, G, O = sum(weight_bytes.values()) + lora_w, sum(grad_bytes.values()) + lora_g, sum(optim_bytes.values()) + lora_o
    if strategy in ("single", "ddp"):
        bucket = G if strategy == "ddp" and count > 1 else 0
        if bucket:
            notes.append("ddp: gradient buckets (a second copy of the gradients) counted under grads")
        gpu_list = [GpuMemory(W, G + bucket, O, act_total) for _ in range(count)]
    elif strategy in ("fsdp", "zero3"):
        layers_path = f"lang_encoder.{model.decoder_layers_path}"
        unit = max(
            sum(weight_bytes[n] for n, _ in named if n.startswith(f"{layers_path}.{k}."))
            for k in range(len(model.decoder_layers))
        )
        notes.append(f"{strategy}: +2 gathered layers ({2 * unit / GiB:.2f} GiB, current + prefetch) under weights")
        gpu_list = [GpuMemory(W // count + 2 * unit, G // count, O // count, act_total) for _ in range(count)]
    elif strategy == "zero2":
        gpu_list = [GpuMemory(W, G // count, O // count, act_total) for _ in range(count)]
    else:  # device_map: one process, layers spread over the GPUs by the planner
        budget = {k: capacity - CUDA_CONTEXT for k in range(count)}
        device_map = plan_device_map(model, budget)
        gpu_list = [GpuMemory() for _ in range(count)]
        for n, _ in named:
            device = resolve_device(device_map, n)
            if not isinstance(device, int):
                notes.append(f"device_map: {n} planned on {device}")
                continue
            gpu_list[device].weights += weight_bytes[n]
            gpu_list[device].gradients += grad_bytes[n]
            gpu_list[device].optimizer += optim_bytes[n]
        _spread_activations(model, device_map, acts, gpu_list)
        if lora:
            gpu_list[0].weights += lora_w
            gpu_list[0].gradients += lora_g
            gpu_list[0].optimizer += lora_o
    return MemoryPlan(gpu_list, capacity, margin, counts, notes)


def check_frames(config, frames: int) -> None:
    """A model takes at most `max_num_frames` frames per image, and one without frame embeddings only one."""
    limit = getattr(config, "max_num_frames", None)
    if frames > 1 and limit is None:
        raise ValueError(f"{frames} frames per image, but this model takes images only (its config has no frame "
                         "embeddings, max_num_frames is None); plan a video checkpoint, e.g. otter-video-llama7b")
    if limit is not None and frames > limit:
        raise ValueError(f"{frames} frames per image, but this model has {limit} frame embeddings (max_num_frames)")


def _spread_activations(model, device_map, acts: dict[str, int], gpus: list[GpuMemory]) -> None:
    """Per-layer activations go where their layer is; vision encoder's and perceiver's with them; the loss with
    lm_head."""
    layers_path = f"lang_encoder.{model.decoder_layers_path}"
    layers = model.decoder_layers
    layer_devices = [resolve_device(device_map, f"{layers_path}.{k}.decoder_layer") for k in range(len(layers))]
    xattn_devices = [d for d, layer in zip(layer_devices, layers) if layer.gated_cross_attn_layer is not None]
    names = [n for n, _ in model.named_parameters()]

    def first(prefix: str):
        return resolve_device(device_map, next(n for n in names if n.startswith(prefix)))

    head = resolve_device(device_map, next(n for n in names if "lm_head" in n or n.endswith("wte.weight")))

    def add(device, amount):
        gpus[device if isinstance(device, int) else 0].activations += int(amount)

    recompute = acts.get("recompute", 0)
    for device in set(layer_devices):
        add(device, recompute)  # each GPU recomputes its own layers
    for device in layer_devices:
        add(device, acts.get("lm_decoder", 0) / len(layer_devices))
    for device in xattn_devices:
        add(device, acts.get("cross_attention", 0) / max(len(xattn_devices), 1))
    add(first("vision_encoder."), acts.get("vision_encoder", 0))
    add(first("perceiver."), acts.get("perceiver", 0))
    add(head, acts.get("embeddings_head", 0))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def format_counts(counts: ParameterCounts) -> str:
    lines = [f"{'part':<16} {'parameters':>15} {'trainable':>15}"]
    for part in PARTS:
        lines.append(f"{part:<16} {counts.total[part]:>15,} {counts.trainable[part]:>15,}")
    if counts.lora:
        lines.append(f"{'lora (r=16)':<16} {counts.lora:>15,} {counts.lora:>15,}")
    lines.append(f"{'total':<16} {counts.total_sum + counts.lora:>15,} {counts.trainable_sum:>15,}")
    return "\n".join(lines)
