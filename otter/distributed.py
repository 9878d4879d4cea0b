"""An `Accelerator` that runs what `accelerate launch` asked for, or fails loudly.

accelerate falls back silently in several ways on machines without GPUs (reference:
shared/reference/distributed-cpu.md): launched processes that each train alone, an FSDP config that
quietly becomes plain data parallel. Each fallback is either repaired here or turned into an error.
"""

import os

import torch
from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import InitProcessGroupKwargs


def _requested(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() == "true"


def requested_distributed_type(world_size: int, cpu: bool) -> DistributedType:
    if _requested("ACCELERATE_USE_FSDP"):
        return DistributedType.FSDP
    if _requested("ACCELERATE_USE_DEEPSPEED"):
        return DistributedType.DEEPSPEED
    if world_size > 1:
        return DistributedType.MULTI_CPU if cpu else DistributedType.MULTI_GPU
    return DistributedType.NO


def _shard_on_cpu(accelerator: Accelerator) -> None:
    """accelerate enables FSDP only for GPU-like devices; FSDP itself runs on CPU with gloo. Switch the
    shared state over, with the plugin built from the launcher's FSDP_* variables."""
    plugin = FullyShardedDataParallelPlugin()
    plugin.sync_module_states = False  # FSDP1 would look for an accelerator device to broadcast from
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # AcceleratorState copies PartialState's fields whenever it is instantiated again: set both.
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # not "cpu:0", which FSDP1 rejects


def make_accelerator(**kwargs) -> Accelerator:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cpu = not torch.cuda.is_available()
    wanted = requested_distributed_type(world_size, cpu)
    if cpu and world_size > 1:
        kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if cpu and wanted == DistributedType.FSDP and accelerator.distributed_type != DistributedType.FSDP:
        _shard_on_cpu(accelerator)
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate runs {accelerator.num_processes}")
    if accelerator.distributed_type != wanted:
        raise RuntimeError(f"asked for {wanted.value} but accelerate set up {accelerator.distributed_type.value}")
    return accelerator
