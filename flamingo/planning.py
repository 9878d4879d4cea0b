"""Plan and check how a Flamingo/Otter model is spread over devices, without the devices.

A 9B model in bf16 (about 15.3 GiB) is too big for many single GPUs, so `from_pretrained(..., device_map="auto")`
splits it. Whether a split is good depends only on sizes and module boundaries, so it can be computed and checked
on the meta device in a fraction of a second, on a machine with no GPU:

    model = meta_model(flamingo.loading.load_config("openflamingo-9b-llama"))
    budget = {0: "22GiB", 1: "22GiB", "cpu": "64GiB"}
    device_map = plan_device_map(model, budget)  # what from_pretrained(device_map="auto") would do
    check_device_map(model, device_map, budget).raise_for_problems()

What a good map must satisfy (each checked by `check_device_map`):

* every parameter and buffer has a device: its longest dotted prefix in the map names one;
* no instance of a `_no_split_modules` class is split across devices: such modules (a decoder layer with its
  residual stream, a `FlamingoLayer` holding the decoder layer *and* its gated cross-attention block) run as one
  unit under one accelerate hook that moves their inputs to one device;
* every gated cross-attention block shares its decoder layer's device: a block elsewhere costs two device-to-device
  copies of the hidden states per forward (IDEFICS' separate module list puts all of them on the last GPU);
* tied parameters share a device;
* no device holds more bytes than its budget.
"""

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import convert_file_size_to_int, get_balanced_memory
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.integrations.accelerate import _get_device_map

from .modeling_flamingo import FlamingoModel

Device = int | str
Planner = Literal["transformers", "accelerate"]
GiB = 2**30


def meta_model(
    config: PreTrainedConfig, dtype: torch.dtype = torch.bfloat16, model_class: type | None = None
) -> PreTrainedModel:
    """The model for `config` with every parameter and buffer on the meta device, in `dtype`.

    Built the way `from_pretrained(dtype=...)` builds it (floating parameters created in `dtype`), so that sizes,
    tied weights and `_no_split_modules` are exactly those the loader plans with; takes well under a second for a
    9B config and no memory. Like `from_pretrained`'s planner, it does not count the fp32 upcast of
    `_keep_in_fp32_modules` in fp16 loads. `model_class` defaults to the class registered with `AutoModel` for the
    config (import `flamingo` / `otter` first)."""
    with torch.device("meta"):
        if model_class is None:
            return AutoModel.from_config(config, dtype=dtype)
        return model_class._from_config(config, dtype=dtype)


def parse_max_memory(max_memory: Mapping[Device, int | str]) -> dict[Device, int]:
    """`{0: "22GiB", "cpu": "64GiB"}` -> bytes per device, as accelerate reads it ("GB" is 10**9, "GiB" 2**30)."""
    return {device: convert_file_size_to_int(budget) for device, budget in max_memory.items()}


@contextlib.contextmanager
def _quiet_missing_gpus() -> Iterator[None]:
    """Planning for GPUs this machine lacks is the point; accelerate's "Device 0 is not available" is noise here."""
    accelerate_logger = logging.getLogger("accelerate.utils.modeling")
    previous = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        accelerate_logger.setLevel(previous)


def plan_device_map(
    model: PreTrainedModel,
    max_memory: Mapping[Device, int | str],
    planner: Planner = "transformers",
    strategy: str = "auto",
) -> dict[str, Device]:
    """A device map for `model` (built with `meta_model`, so in the dtype it will be loaded in) within `max_memory`.

    `planner="transformers"` runs what `from_pretrained(device_map=strategy, max_memory=...)` runs;
    `planner="accelerate"` runs `accelerate.infer_auto_device_map`, as `load_checkpoint_and_dispatch(device_map=
    strategy)` does. With both, `"auto"` / `"balanced"` first shrink the budgets of all GPUs but the last to an even
    share of the model (plus the largest unsplittable block), and `"sequential"` fills GPU 0 before GPU 1."""
    budget = dict(max_memory)  # both planners convert the budget strings in place
    no_split = sorted(model._no_split_modules)
    with _quiet_missing_gpus():
        if planner == "transformers":
            return dict(_get_device_map(model, strategy, budget, None))
        if planner == "accelerate":
            if strategy != "sequential":
                low_zero = strategy == "balanced_low_0"
                budget = get_balanced_memory(model, budget, no_split, dtype=model.dtype, low_zero=low_zero)
            device_map = infer_auto_device_map(model, budget, no_split_module_classes=no_split, dtype=model.dtype)
            return dict(device_map)
    raise ValueError(f"planner must be 'transformers' or 'accelerate', got {planner!r}")


def explicit_device_map(model: nn.Module, placements: Mapping[str, Device], default: Device) -> dict[str, Device]:
    """A complete device map that puts each module named in `placements` on its device and the rest on `default`.

    accelerate refuses a map whose entries nest (`{"": "cpu", "perceiver": "disk"}` fails at dispatch with
    "latents is on the meta device"), so every module on the way to a placed one is replaced by its children
    (and its own parameters and buffers), which get `default` unless placed themselves."""
    for name in placements:
        model.get_submodule(name)  # fail early on a typo rather than load everything on `default`
    device_map: dict[str, Device] = {}

    def place(name: str, module: nn.Module) -> None:
        if name in placements:
            device_map[name] = placements[name]
            return
        if not any(key.startswith(f"{name}.") or name == "" for key in placements):
            device_map[name] = default
            return
        prefix = f"{name}." if name else ""
        for tensor_name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[prefix + tensor_name] = default
        for child_name, child in module.named_children():
            place(prefix + child_name, child)

    place("", model)
    return device_map


def resolve_device(device_map: Mapping[str, Device], tensor_name: str) -> Device | None:
    """The device of a parameter or buffer: the entry of its longest prefix at a module boundary (`""` is the
    whole model), as accelerate dispatches it; None if no entry covers it."""
    parts = tensor_name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    return None


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers (persistent or not: both take device memory), each once."""
    yield from module.named_parameters()
    yield from module.named_buffers()


@dataclass
class DeviceMapReport:
    """Where a device map puts a model, and what is wrong with it (`problems` is empty for a good map)."""

    bytes_per_device: dict[Device, int]
    decoder_layers_per_device: dict[Device, list[int]]
    problems: list[str] = field(default_factory=list)

    def gib_per_device(self) -> dict[Device, float]:
        return {device: round(size / GiB, 2) for device, size in self.bytes_per_device.items()}

    def raise_for_problems(self) -> "DeviceMapReport":
        if self.problems:
            raise ValueError("bad device map:\n  " + "\n  ".join(self.problems))
        return self

    def decoder_layer_ranges(self) -> dict[Device, str]:
        """{0: "0-14", 1: "15-31"}: a comma means the layer stack visits a device twice (extra copies)."""
        return {device: _ranges(layers) for device, layers in self.decoder_layers_per_device.items()}

    def summary(self) -> str:
        """Per device: GiB and the decoder layers it holds."""
        ranges = self.decoder_layer_ranges()
        return "; ".join(
            f"{device}: {size:.2f} GiB, layers {ranges.get(device, '-')}"
            for device, size in self.gib_per_device().items()
        )


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def check_device_map(
    model: FlamingoModel, device_map: Mapping[str, Device], max_memory: Mapping[Device, int | str] | None = None
) -> DeviceMapReport:
    """Check `device_map` for `model` (see the module docstring for the rules); never raises, lists problems.

    Works on a meta model (planning) and on a loaded one (`model.hf_device_map`). Budgets are checked only for
    the devices named in `max_memory`; "disk" has none."""
    tensor_device = {name: resolve_device(device_map, name) for name, _ in _named_tensors(model)}
    unplaced = [name for name, device in tensor_device.items() if device is None]
    problems = [f"{name} is on no device (no prefix of it in the map)" for name in unplaced]
    bytes_per_device = _bytes_per_device(model, tensor_device)
    problems += _split_no_split_modules(model, tensor_device)
    problems += _tied_weights_apart(model, device_map)
    problems += _over_budget(bytes_per_device, max_memory or {})
    layers_per_device, layer_problems = _decoder_layer_placement(model, tensor_device)
    return DeviceMapReport(bytes_per_device, layers_per_device, problems + layer_problems)


def _bytes_per_device(model: nn.Module, tensor_device: Mapping[str, Device | None]) -> dict[Device, int]:
    sizes: dict[Device, int] = defaultdict(int)
    for name, tensor in _named_tensors(model):
        if tensor_device[name] is not None:
            sizes[tensor_device[name]] += tensor.numel() * tensor.element_size()
    return dict(sizes)


def _devices_of(module_name: str, module: nn.Module, tensor_device: Mapping[str, Device | None]) -> set[Device | None]:
    prefix = f"{module_name}." if module_name else ""
    return {tensor_device[prefix + name] for name, _ in _named_tensors(module)}


def _split_no_split_modules(model: PreTrainedModel, tensor_device: Mapping[str, Device | None]) -> list[str]:
    no_split = set(model._no_split_modules or ())
    problems = []
    for name, module in model.named_modules():
        if type(module).__name__ in no_split:
            devices = _devices_of(name, module, tensor_device)
            if len(devices) > 1:
                kind = type(module).__name__
                problems.append(f"{name} ({kind}, must not be split) spans {sorted(map(str, devices))}")
    return problems


def _tied_weights_apart(model: PreTrainedModel, device_map: Mapping[str, Device]) -> list[str]:
    problems = []
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        target_device, source_device = resolve_device(device_map, target), resolve_device(device_map, source)
        if target_device != source_device:
            problems.append(f"tied {target} ({target_device}) and {source} ({source_device}) are on different devices")
    return problems


def _over_budget(bytes_per_device: Mapping[Device, int], max_memory: Mapping[Device, int | str]) -> list[str]:
    budget = parse_max_memory(max_memory)
    return [
        f"device {device} holds {size / GiB:.2f} GiB, over its budget of {budget[device] / GiB:.2f} GiB"
        for device, size in bytes_per_device.items()
        if device in budget and size > budget[device]
    ]


def _decoder_layer_placement(
    model: FlamingoModel, tensor_device: Mapping[str, Device | None]
) -> tuple[dict[Device, list[int]], list[str]]:
    """Decoder layer indices per device, and a problem for each layer whose cross-attention block (or any part)
    is on another device than the rest. Checked even if `FlamingoLayer` left `_no_split_modules`."""
    layers_path = f"lang_encoder.{model.decoder_layers_path}"
    layers_per_device: dict[Device, list[int]] = defaultdict(list)
    problems = []
    for index, layer in enumerate(model.decoder_layers):
        name = f"{layers_path}.{index}"
        decoder_devices = _devices_of(f"{name}.decoder_layer", layer.decoder_layer, tensor_device)
        devices = _devices_of(name, layer, tensor_device)
        if len(devices) > 1:
            has_block = layer.gated_cross_attn_layer is not None
            parts = "its gated cross-attention block and decoder layer" if has_block else "its parts"
            problems.append(f"decoder layer {index} ({name}) is split: {parts} span {sorted(map(str, devices))}")
        for device in decoder_devices:
            layers_per_device[device].append(index)
    return dict(layers_per_device), problems


__all__ = [
    "GiB",
    "DeviceMapReport",
    "check_device_map",
    "explicit_device_map",
    "meta_model",
    "parse_max_memory",
    "plan_device_map",
    "resolve_device",
]
