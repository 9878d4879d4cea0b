"""An `Accelerator` that runs what `accelerate launch` asked for, or fails loudly.

accelerate falls back silently in several ways on machines without GPUs (reference:
shared/reference/distributed-cpu.md): launched processes that each train alone, an FSDP config that
quietly becomes plain data parallel. Each fallback is either repaired here or turned into an error.
"""

import os
from contextlib import contextmanager

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
    # accelerate ignores the DeepSpeed config when `cpu=True` (plain MULTI_CPU instead); without the flag it starts
    # DeepSpeed's process group on the backend given above, and DeepSpeed runs on its CPU accelerator.
    accelerator = Accelerator(cpu=cpu and wanted != DistributedType.DEEPSPEED, **kwargs)
    if cpu and wanted == DistributedType.FSDP and accelerator.distributed_type != DistributedType.FSDP:
        _shard_on_cpu(accelerator)
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launched {world_size} processes but accelerate runs {accelerator.num_processes}")
    if accelerator.distributed_type != wanted:
        raise RuntimeError(f"asked for {wanted.value} but accelerate set up {accelerator.distributed_type.value}")
    return accelerator


def configure_deepspeed(accelerator: Accelerator, *, micro_batch_size: int, gradient_accumulation_steps: int,
                        gradient_clipping: float) -> None:
    """Fill DeepSpeed's config from the training script's flags, before `prepare(model, ...)`.

    accelerate takes the micro batch size from a dataloader prepared in the same call (otter-train prepares
    its loader first), and lets the launcher's `gradient_accumulation_steps`/`gradient_clipping` override the
    script's silently. Here the flags decide; a launcher config that sets a different value is an error. ZeRO-3
    always gathers the 16-bit (in fact: the engine's dtype) weights on save: `save_pretrained` needs them.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": micro_batch_size,
              "gradient_accumulation_steps": gradient_accumulation_steps,
              "gradient_clipping": float(gradient_clipping)}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current != "auto" and current != value:
            raise ValueError(f"the DeepSpeed config sets {key}={current} but otter-train's flags ask for {value}: "
                             f"remove {key} from the accelerate/DeepSpeed config (the flags set it) or make them agree")
        config[key] = value
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * accelerator.num_processes
    if config.get("zero_optimization", {}).get("stage") == 3:
        if accelerator.state.deepspeed_plugin.zero3_init_flag:
            raise ValueError("zero3_init_flag: true is not supported: Otter's embedding row masks need whole "
                             "tensors when the model is set up. Set it to false (each process builds the model, "
                             "DeepSpeed then shards it)")
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


@contextmanager
def hide_zero3_from_transformers(accelerator: Accelerator):
    """Build, load and run models as if no ZeRO-3 were configured.

    accelerate registers its ZeRO-3 config with transformers whatever `zero3_init_flag` says, and transformers then
    builds every model (and sub-model from a config) under `deepspeed.zero.Init`, initialised on rank 0 only (other
    weights than DDP's from the same seed), and generates with `synced_gpus`. Both are collectives: the main process
    alone reloading and scoring the saved model would wait for the others forever."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)
