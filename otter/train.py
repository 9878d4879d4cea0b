"""`otter-train`: instruction-tune Otter on image-instruction data with in-context examples, with accelerate.

    otter-train                                    # the tiny Otter on the bundled toy data, on the CPU
    accelerate launch --config_file configs/accelerate/ddp.yaml -m otter.train \\
        --model luodian/OTTER-LLaMA7B-Init --tokenizer luodian/llama-7b-hf --data mixture.yaml

Writes to `--output-dir`: `checkpoints/step-NNNNNN/` (accelerate state, written atomically, the last
`--keep-checkpoints` kept), `model/` (`save_pretrained` + processor), `runs/` (TensorBoard),
`loss.png`, and `summary.json` with the held-out accuracy, with real and with blank images.
"""

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import is_tensorboard_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_layers import GradientCheckpointingLayer

from otter import OtterModel, OtterProcessor
from otter.data.collate import OtterCollator
from otter.data.mimicit import MimicItDataset
from otter.data.mixture import load_mixture
from otter.data.toy import toy_dataset_paths
from otter.distributed import configure_deepspeed, hide_zero3_from_transformers, make_accelerator
from otter.evaluate import answer_accuracy
from flamingo.loading import has_weights, load_model, load_processor, resolve
from otter.defaults import TINY_OTTER, record_trained_model

logger = logging.getLogger(__name__)


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=TINY_OTTER, help="hub id, folder or shipped config name; a config without weights trains "
        "from scratch (default: the tiny Otter)")
    add("--tokenizer", help="base tokenizer for checkpoints that ship none (Otter's tokens are added)")
    add("--data", help="mixture file (YAML/JSON); default: the bundled toy dataset")
    add("--heldout", help="MIMIC-IT instructions JSON of the held-out split (images/train-config beside it)")
    add("--output-dir", type=Path, default=Path("outputs/otter-tiny"))
    add("--trainable", choices=["auto", "otter", "all", "lora"], default="auto",
        help="otter: perceiver + cross-attention + new token rows; all: everything; lora: otter + LoRA on the LM; "
        "auto: all for a model built from scratch, otter otherwise")
    add("--train-vision-encoder", action="store_true")
    add("--epochs", type=float, default=14.0)
    add("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    add("--batch-size", type=int, default=16, help="per process")
    add("--grad-accum", type=int, default=1)
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=0.0)
    add("--warmup-ratio", type=float, default=0.03)
    add("--max-grad-norm", type=float, default=1.0)
    add("--max-length", type=int, default=256)
    add("--gradient-checkpointing", action="store_true")
    add("--mixed-precision", choices=["no", "bf16", "fp16"],
        help="autocast (DeepSpeed: its bf16/fp16 engine); default: what `accelerate launch`/its config says, else no")
    add("--save-every", type=int, default=200, help="checkpoint every N optimizer steps (0: only at the end)")
    add("--keep-checkpoints", type=int, default=2)
    add("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    add("--eval-samples", type=int, default=200, help="held-out samples to score (0: skip evaluation)")
    add("--push-to-hub", metavar="REPO_ID")
    add("--seed", type=int, default=0)
    add("--num-workers", type=int, default=0)
    return parser.parse_args(argv)


# ---- setup ----------------------------------------------------------------------------------------
def load_model_and_processor(args: argparse.Namespace) -> tuple[OtterModel, OtterProcessor, bool]:
    """Returns (model, processor, from_scratch)."""
    source = resolve(args.model)
    from_scratch = Path(source).is_dir() and not has_weights(source)
    return load_model(source, seed=args.seed).train(), load_processor(source, tokenizer=args.tokenizer), from_scratch


def configure_trainable(model: OtterModel, args: argparse.Namespace, from_scratch: bool) -> str:
    """Freezing a randomly initialised LM makes no sense, hence `auto`."""
    choice = args.trainable if args.trainable != "auto" else ("all" if from_scratch else "otter")
    if from_scratch:
        open_gates(model)
    if choice == "lora":  # before set_trainable: peft freezes everything around the adapters it adds
        from peft import LoraConfig, inject_adapter_in_model

        targets = r".*\.decoder_layer\..*\.(q_proj|v_proj|query_key_value|Wqkv)$"
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets), model.lang_encoder)
    model.set_trainable(language_model=choice == "all", vision_encoder=choice == "all" or args.train_vision_encoder)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    return choice


def open_gates(model: OtterModel, value: float = 0.5) -> None:
    """Gates start at 0 so that a new block leaves a pretrained LM unchanged; a model trained from scratch has
    nothing to preserve, and closed gates let it fit the answers' prior long before it looks at the images."""
    with torch.no_grad():
        for layer in model.decoder_layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(value)
                layer.gated_cross_attn_layer.ff_gate.fill_(value)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay only on the cross-attention matrices (Otter): never on gates, norms, biases, or the
    embeddings, whose frozen rows would otherwise decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = "gated_cross_attn_layer" in name and not any(k in name for k in ("gate", "norm", "bias", "feed_forward.0"))
        (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def load_datasets(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    if args.data is None:
        paths = toy_dataset_paths()
        return MimicItDataset(**paths["train"], seed=args.seed), MimicItDataset(**paths["heldout"], seed=args.seed)
    heldout = None
    if args.heldout:
        folder = Path(args.heldout).parent
        heldout = MimicItDataset(args.heldout, folder / "images.json", seed=args.seed)
    return load_mixture(args.data), heldout


# ---- checkpoints ----------------------------------------------------------------------------------
class Checkpoints:
    """`step-NNNNNN/` folders of accelerate state. Each is written as `.tmp` and renamed when complete, so a
    kill during a write leaves the previous checkpoint as the latest usable one."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def complete(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self) -> Path | None:
        return (self.complete() or [None])[-1]

    def save(self, accelerator: Accelerator, step: int) -> Path:
        final = self.folder / f"step-{step:06d}"
        partial = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(partial, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final


class StepLog:
    """One JSON line per optimizer step in `log.jsonl`. Resuming from step N keeps the lines up to N (a
    killed run may have logged steps after its last checkpoint) and appends from there."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [line for line in self._lines() if json.loads(line)["step"] <= resume_step] if resume_step else []
            path.write_text("".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def write(self, **values) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(values) + "\n")

    def losses(self) -> list[tuple[int, float]]:
        if not self.enabled:
            return []
        rows = [json.loads(line) for line in self._lines()]
        return [(row["step"], row["loss"]) for row in rows]


class StopRequested:
    """SIGTERM (a scheduler preempting the job) asks for a checkpoint and a clean exit after the current step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True


# ---- training -------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if is_tensorboard_available() else None,  # pip install '.[train]'
        project_dir=str(args.output_dir),
        **({"mixed_precision": args.mixed_precision} if args.mixed_precision else {}),
    )
    configure_deepspeed(accelerator, micro_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                        gradient_clipping=args.max_grad_norm)
    if accelerator.gradient_accumulation_steps != args.grad_accum:  # the launcher's setting wins in accelerate
        raise ValueError(f"accelerate accumulates over {accelerator.gradient_accumulation_steps} batches "
                         f"but --grad-accum is {args.grad_accum}")
    set_seed(args.seed)
    with hide_zero3_from_transformers(accelerator):  # zero3_init_flag is false (configure_deepspeed)
        model, processor, from_scratch = load_model_and_processor(args)
    trainable = configure_trainable(model, args, from_scratch)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        checkpointed = sum(bool(getattr(m, "gradient_checkpointing", False))
                           for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        if not checkpointed:
            raise RuntimeError("--gradient-checkpointing: no layer of this model checkpoints its activations")
        logger.info("gradient checkpointing: %d layers recompute their activations in the backward pass", checkpointed)
    train_set, heldout_set = load_datasets(args)
    collator = OtterCollator(processor, max_length=args.max_length)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collator, num_workers=args.num_workers, drop_last=True)
    loader = accelerator.prepare(loader)  # now per process

    steps_per_epoch = len(loader) // args.grad_accum
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step (under DeepSpeed too: a
    # LambdaLR is not one of DeepSpeed's schedulers, so accelerate, not the engine, steps it).
    schedule_steps = total_steps * accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * schedule_steps), schedule_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    checkpoints = Checkpoints(args.output_dir / "checkpoints", args.keep_checkpoints)
    step = resume(accelerator, checkpoints) if args.resume else 0
    accelerator.init_trackers("runs", config={k: str(v) for k, v in vars(args).items()})
    stop = StopRequested()
    parameters = sum(parameter_count(p) for p in model.parameters())
    trained = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    logger.info("training %s of %s parameters (%s) for %d steps on %d process(es), %s%s, mixed precision %s",
                f"{trained:,}", f"{parameters:,}", trainable, total_steps, accelerator.num_processes,
                accelerator.distributed_type.value, zero_stage(accelerator), accelerator.mixed_precision)
    logger.info("process %d holds %s parameter values", accelerator.process_index, f"{local_parameter_count(model):,}")

    log = StepLog(args.output_dir / "log.jsonl", accelerator.is_main_process, resume_step=step)
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train", mininterval=2.0)
    model.train()
    while step < total_steps and not stop.requested:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * args.grad_accum) if done_in_epoch else loader
        tokens, window_start, last_batch = 0, time.perf_counter(), None
        for batch in batches:
            if batch is None and accelerator.num_processes == 1:
                continue  # every sample of it was unusable (counted by the collator)
            with accelerator.accumulate(model):
                loss = model(**batch).loss if batch is not None else zero_loss(model, last_batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if batch is not None:
                last_batch = batch
                tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            log.write(step=step, loss=mean_loss, lr=scheduler.get_last_lr()[0])
            accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - window_start):.0f}")
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                checkpoints.save(accelerator, step)
            if step >= total_steps or stop.requested:
                break
        if accelerator.is_main_process:
            collator.summary()
            if hasattr(train_set, "summary"):
                logger.info(train_set.summary())
    bar.close()
    train_seconds = time.perf_counter() - started
    if stop.requested:
        checkpoints.save(accelerator, step)
        accelerator.end_training()
        return {"stopped_at": step}

    summary = finish(accelerator, model, processor, heldout_set, args, step, train_seconds, log.losses())
    accelerator.end_training()
    return summary


def parameter_count(parameter: torch.Tensor) -> int:
    """Under ZeRO-3 a parameter's own tensor is empty; `ds_numel` is its full size."""
    return getattr(parameter, "ds_numel", parameter.numel())


def local_parameter_count(model: torch.nn.Module) -> int:
    """Values this process stores: all of them under DDP and ZeRO-2, its shard under FSDP (DTensor parameters) and
    ZeRO-3 (`ds_tensor`)."""
    def local(p: torch.Tensor) -> int:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

    return sum(local(p) for p in model.parameters())


def zero_stage(accelerator: Accelerator) -> str:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return ""
    return f" ZeRO-{accelerator.state.deepspeed_plugin.deepspeed_config['zero_optimization']['stage']}"


def zero_loss(model: torch.nn.Module, last_batch: dict | None) -> torch.Tensor:
    """Under data parallelism every process must run the same collectives, so a batch with no usable sample
    cannot be skipped on one process alone: it becomes a zero-weighted pass over the previous batch."""
    if last_batch is None:
        raise ValueError("the first batch of this process has no usable sample (see the collator's summary)")
    return model(**last_batch).loss * 0.0


def resume(accelerator: Accelerator, checkpoints: Checkpoints) -> int:
    latest = checkpoints.latest()
    if latest is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", checkpoints.folder)
        return 0
    accelerator.load_state(str(latest))
    logger.info("resumed from %s", latest)
    return int(latest.name.removeprefix("step-"))


def finish(accelerator, model, processor, heldout_set, args, step, train_seconds, losses) -> dict:
    """Save the model, score the saved copy on the held-out split, write summary.json and the loss curve.
    Scoring reloads the saved folder: the trained model may be sharded over processes (FSDP, ZeRO-3), and
    this also proves that what was written loads."""
    model_dir = args.output_dir / "model"
    state_dict = accelerator.get_state_dict(model)  # gathered on the main process, on every strategy
    summary = {"steps": step, "train_seconds": round(train_seconds, 1), "model_dir": str(model_dir)}
    # Only this process loads and generates: under ZeRO-3, transformers would make both collectives (zero.Init,
    # generate's synced_gpus) and wait for the other processes forever.
    with hide_zero3_from_transformers(accelerator):
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(model_dir, state_dict=state_dict)
            processor.save_pretrained(model_dir)
            record_trained_model(model_dir)
            if args.push_to_hub:
                OtterModel.from_pretrained(model_dir).push_to_hub(args.push_to_hub)
                processor.push_to_hub(args.push_to_hub)
            if heldout_set is not None and args.eval_samples:
                saved = OtterModel.from_pretrained(model_dir).eval()
                samples = [heldout_set[i] for i in range(min(args.eval_samples, len(heldout_set)))]
                summary["heldout_accuracy"] = answer_accuracy(saved, processor, samples)
                summary["blank_image_accuracy"] = answer_accuracy(saved, processor, samples, blank_images=True)
            (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_losses(losses, args.output_dir / "loss.png")
    accelerator.wait_for_everyone()
    return summary


def plot_losses(losses: list[tuple[int, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install '.[train]'): no loss curve")
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*losses))
    axes.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="otter-train")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(args)
    if "heldout_accuracy" in summary:
        print(f"held-out accuracy {summary['heldout_accuracy']:.3f} (blank images: {summary['blank_image_accuracy']:.3f}) "
              f"after {summary['steps']} steps, {summary['train_seconds']:.0f} s; model in {summary['model_dir']}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # gloo can abort at interpreter exit after training (reference/distributed-cpu.md): leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
