"""Instruction tuning with accelerate: `setup` builds the run, `loop` trains it, `finish` saves and scores it.

`otter-train` (otter/train.py) parses the command line and calls `train(args)`; research code can call the three
parts itself. One process or many (DDP, FSDP, DeepSpeed ZeRO-2/3 through `accelerate launch`), on CPUs or GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import is_tensorboard_available, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_layers import GradientCheckpointingLayer

from flamingo import recipes
from flamingo.eval.tasks import Task
from flamingo.hub import push_folder, write_model_card
from flamingo.loading import has_weights, load_model, load_processor, resolve
from otter import OtterModel, OtterProcessor
from otter.data.collate import OtterCollator, UsableSamples
from otter.data.copying import BATCH_SIZE as COPYING_BATCH_SIZE
from otter.data.copying import LEARNING_RATE as COPYING_LR
from otter.data.copying import copying_accuracy, copying_batch
from otter.data.main_job import EXTRA_CONDITIONS, bundled_data
from otter.data.mimicit import MimicItDataset
from otter.data.mixture import TaskBatches, WeightedMixture, load_mixture
from otter.defaults import BUNDLED_DATA, SHIPPED_COPIER, TINY_OTTER, record_trained_model, starts_from_copier
from otter.distributed import configure_deepspeed, hide_zero3_from_transformers, make_accelerator
from otter.evaluate import episode_accuracy, heldout_tasks, task_scores

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds between `setup`, `loop` and `finish`."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module
    processor: OtterProcessor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    train_set: UsableSamples
    heldout_sets: dict[str, torch.utils.data.Dataset]  # by task name; empty: nothing to score
    heldout: dict[str, dict[str, Task]]  # the main process's: each task's scored samples, per condition (write_heldout)
    checkpoints: Checkpoints
    steps_per_epoch: int
    total_steps: int
    start_step: int
    copying: dict | None  # what pretrain_copying did, None if nothing


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the summary (`summary.json`), or `{"stopped_at": step}` after a SIGTERM."""
    run = setup(args)
    step, seconds, stopped = loop(run)
    if stopped:
        run.accelerator.end_training()
        return {"stopped_at": step}
    summary = finish(run, step, seconds)
    run.accelerator.end_training()
    return summary


# ---- setup ----------------------------------------------------------------------------------------
def setup(args: argparse.Namespace) -> Run:
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
    model.set_attn_implementation(args.attn_implementation or default_attention(accelerator))
    trainable = configure_trainable(model, args, from_scratch)
    # (A resumed run does this too, then loads its checkpoint's weights over the result.)
    if starts_from_copier(args.data, from_scratch, args.copying_steps):
        copying = load_copier(model, SHIPPED_COPIER)
    else:
        copying = pretrain_copying(model, processor, args.copying_steps or 0, seed=args.seed,
                                   show_progress=accelerator.is_local_main_process)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    train_set, heldout_sets = load_datasets(args, processor)
    heldout = write_heldout(heldout_sets, args) if accelerator.is_main_process else {}
    mixture = train_set.dataset
    sampler = TaskBatches(mixture, args.batch_size, args.seed) if isinstance(mixture, WeightedMixture) else None
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=OtterCollator(processor), num_workers=args.num_workers, drop_last=True)
    loader = accelerator.prepare(loader)  # now per process

    steps_per_epoch = len(loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} samples, fewer than one optimizer step takes "
                         f"(--batch-size {args.batch_size} x {accelerator.num_processes} process(es) x --grad-accum "
                         f"{args.grad_accum}): use a smaller batch or more data")
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    optimizer = recipes.adamw(model, args.lr, args.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step (under DeepSpeed too: a
    # LambdaLR is not one of DeepSpeed's schedulers, so accelerate, not the engine, steps it).
    schedule_steps = total_steps * accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * schedule_steps), schedule_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    checkpoints = Checkpoints(args.output_dir / "checkpoints", args.keep_checkpoints)
    start_step = checkpoints.resume(accelerator) if args.resume else 0
    accelerator.init_trackers("runs", config={k: str(v) for k, v in vars(args).items()})
    parameters = sum(parameter_count(p) for p in model.parameters())
    trained = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    logger.info("training %s of %s parameters (%s) for %d steps on %d process(es), %s%s, mixed precision %s",
                f"{trained:,}", f"{parameters:,}", trainable, total_steps, accelerator.num_processes,
                accelerator.distributed_type.value, zero_stage(accelerator), accelerator.mixed_precision)
    logger.info("process %d holds %s parameter values", accelerator.process_index, f"{local_parameter_count(model):,}")
    return Run(args, accelerator, model, processor, optimizer, scheduler, loader, train_set, heldout_sets, heldout,
               checkpoints, steps_per_epoch, total_steps, start_step, copying)


def write_heldout(heldout_sets: dict[str, torch.utils.data.Dataset], args: argparse.Namespace) -> dict[str, dict[str, Task]]:
    """Each task's first `--eval-samples` held-out samples as flamingo-eval tasks under `<output>/heldout/<task>/`
    (otter.evaluate.heldout_tasks): what the probes and the final scores run, and what `flamingo-eval` reruns."""
    if not args.eval_samples:
        return {}
    return {task: heldout_tasks(first_samples(dataset, args.eval_samples), args.output_dir / "heldout" / task, task,
                                EXTRA_CONDITIONS.get(task))
            for task, dataset in heldout_sets.items()}


def load_model_and_processor(args: argparse.Namespace) -> tuple[OtterModel, OtterProcessor, bool]:
    """Returns (model, processor, from_scratch)."""
    source = resolve(args.model)
    from_scratch = Path(source).is_dir() and not has_weights(source)
    return load_model(source, seed=args.seed).train(), load_processor(source, tokenizer=args.tokenizer), from_scratch


def default_attention(accelerator: Accelerator) -> str:
    """SDPA on GPUs; on CPUs plain matmuls (eager), which at the tiny Otter's sizes (head dim 16, a few dozen
    tokens) train the main job's step faster than SDPA's CPU kernels (scripts/benchmark_train_step.py)."""
    return "eager" if accelerator.device.type == "cpu" else "sdpa"


def configure_trainable(model: OtterModel, args: argparse.Namespace, from_scratch: bool) -> str:
    """Freezing a randomly initialised LM makes no sense, hence `auto`."""
    choice = args.trainable if args.trainable != "auto" else ("all" if from_scratch else "otter")
    if from_scratch:
        start_from_scratch(model)
    recipes.apply(model, choice, train_vision_encoder=args.train_vision_encoder)
    return choice


def start_from_scratch(model: OtterModel) -> None:
    """What a model built from random weights needs before training: open gates and a vision encoder that knows
    where its patches are."""
    open_gates(model)
    sincos_position_embeddings(model.vision_encoder.embeddings.position_embedding)


def sincos_position_embeddings(embedding: nn.Embedding, scale: float = 0.2, temperature: float = 10000.0) -> None:
    """Fill a ViT's position embeddings (class token first, then a square grid of patches, row by row) with the
    2D sin-cos pattern of MAE and MoCo v3 times `scale` (they still train), the class token's with zeros. CLIP's
    random ones start at std 0.02, a fifth of the tiny Otter's patch embeddings of the toy pictures (std 0.1), and
    some seeds had not learned where a shape is after the main job's 2374 steps; at scale 0.2 the pattern has the
    patches' std, and at full scale (std 0.7) it drowned what the patches show: the toy video task stayed at chance
    (README, "How the recipe was found")."""
    patches, dim = embedding.num_embeddings - 1, embedding.embedding_dim
    side = math.isqrt(patches)
    if side * side != patches or dim % 4:
        raise ValueError(f"sin-cos position embeddings need a square grid and a width divisible by 4, got "
                         f"{patches} patches of width {dim}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (side, side) each
    frequencies = temperature ** -(torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    angles_x = cols.flatten()[:, None] * frequencies  # (patches, dim/4)
    angles_y = rows.flatten()[:, None] * frequencies
    with torch.no_grad():
        embedding.weight[0].zero_()
        embedding.weight[1:] = scale * torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], 1)


def open_gates(model: OtterModel, value: float = 0.5) -> None:
    """Gates start at 0 so that a new block leaves a pretrained LM unchanged; a model trained from scratch has
    nothing to preserve, and closed gates let it fit the answers' prior long before it looks at the images."""
    with torch.no_grad():
        for layer in model.decoder_layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(value)
                layer.gated_cross_attn_layer.ff_gate.fill_(value)


def pretrain_copying(model: OtterModel, processor: OtterProcessor, steps: int, *, seed: int, lr: float = COPYING_LR,
                     batch_size: int = COPYING_BATCH_SIZE, make_batch: Callable[..., dict] = copying_batch,
                     show_progress: bool = True) -> dict | None:
    """Train the language model alone on copying for `steps` steps (its own AdamW at `lr`); returns the steps, seconds
    and copying accuracy afterwards (for summary.json), None when `steps` is 0. Runs before accelerate wraps the model,
    the same on every process (same seed, same batches), so the processes stay identical without communicating."""
    if steps == 0:
        return None
    language_model, vocab_size = model.lang_encoder, processor.tokenizer.vocab_size  # below Otter's added tokens
    generator, started = torch.Generator().manual_seed(seed), time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in language_model.parameters() if p.requires_grad], lr=lr)
    for _ in tqdm(range(steps), desc="copying", disable=not show_progress, mininterval=2.0):
        language_model(**make_batch(vocab_size, batch_size, generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    accuracy = copying_accuracy(language_model, vocab_size, torch.Generator().manual_seed(seed + 1))
    seconds = time.perf_counter() - started
    logger.info("copying pretraining: %d steps in %.0f s, accuracy %.3f on fresh sequences", steps, seconds, accuracy)
    return {"steps": steps, "seconds": round(seconds, 1), "accuracy": round(accuracy, 4)}


def load_copier(model: OtterModel, folder: Path) -> dict:
    """Start the language model from a copy of `pretrain_copying`'s result (scripts/make_tiny_copier.py); returns
    its record, for summary.json."""
    try:
        model.load_language_model_state_dict(load_file(folder / "model.safetensors"))
    except ValueError as error:  # another model's shapes, or names
        raise ValueError(f"the shipped copier {folder} was made for {TINY_OTTER} and does not fit this model "
                         f"({error}); pass --copying-steps N to pretrain this model's language model instead") from None
    record = json.loads((folder / "record.json").read_text())
    logger.info("language model from %s: %d copying steps, accuracy %.3f", folder, record["steps"], record["accuracy"])
    return record | {"from": str(folder)}


def enable_checkpointing(model: OtterModel) -> None:
    model.activation_checkpointing_enable()
    checkpointed = sum(bool(getattr(m, "gradient_checkpointing", False))
                       for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    if not checkpointed:
        raise RuntimeError("--gradient-checkpointing: no layer of this model checkpoints its activations")
    logger.info("gradient checkpointing: %d layers recompute their activations in the backward pass", checkpointed)


def load_datasets(args: argparse.Namespace, processor: OtterProcessor) -> tuple[UsableSamples, dict[str, MimicItDataset]]:
    """The training set, and the held-out sets by task: a bundled set's tasks (`--data toy`, ...), else `--heldout`."""
    if args.data in BUNDLED_DATA:
        train_set, heldout = bundled_data(args.data, args.seed)
    else:
        train_set, heldout = load_mixture(args.data), {}
        if args.heldout:
            folder = Path(args.heldout).parent
            config = folder / "train_config.json"
            heldout["heldout"] = MimicItDataset(args.heldout, folder / "images.json", config if config.is_file() else None,
                                                seed=args.seed)
    return UsableSamples(train_set, processor, max_length=args.max_length), heldout


# ---- the loop -------------------------------------------------------------------------------------
def training_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The batch's next-token loss on its labels, with the language model's head run only at the supervised
    positions (`loss_only`): the full loss and gradients, without a (batch, length, vocab) logits tensor kept for
    the backward pass. Otter's labels cover the answers alone, so this also skips most of the head's arithmetic."""
    return model(**batch, loss_only=True).loss


def loop(run: Run) -> tuple[int, float, bool]:
    """Train from `run.start_step` to `run.total_steps`; returns (last step, seconds, stopped by SIGTERM). The last
    step is always checkpointed, so `--resume` with a larger `--max-steps` continues where this run ended."""
    args, accelerator, model = run.args, run.accelerator, run.model
    step, stop = run.start_step, StopRequested()
    log = StepLog(args.output_dir / "log.jsonl", accelerator.is_main_process, resume_step=step)
    started = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train",
               mininterval=2.0)
    model.train()
    while step < run.total_steps and not stop.requested:
        epoch, done_in_epoch = divmod(step, run.steps_per_epoch)
        run.loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.loader, done_in_epoch * args.grad_accum) if done_in_epoch else run.loader
        tokens, window_start = 0, time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            lr = run.scheduler.get_last_lr()[0]
            log.write(step=step, loss=mean_loss, lr=lr)
            accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - window_start):.0f}")
            if args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
                probe(run, step, log, bar)
            if args.save_every and step % args.save_every == 0 and step < run.total_steps:
                run.checkpoints.save(accelerator, step)
            if step >= run.total_steps or stop.requested:
                break
        if accelerator.is_main_process:
            bar.write(run.train_set.summary())
    bar.close()
    run.checkpoints.save(accelerator, step)
    return step, time.perf_counter() - started, stop.requested


PROBE_SAMPLES = 64  # per task: enough to see the curve rise, few enough to cost a second or two
WHOLE_MODEL = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def probe(run: Run, step: int, log: StepLog, bar: tqdm) -> None:
    """Held-out accuracy (with examples) of the model as it is now, on the first `PROBE_SAMPLES` of each task, into
    the step log, TensorBoard and the progress bar. Only where one process holds the whole model (one process, DDP):
    a sharded model (FSDP, DeepSpeed) would need every process to generate together."""
    accelerator = run.accelerator
    if not (run.heldout_sets and run.args.eval_samples) or accelerator.distributed_type not in WHOLE_MODEL:
        return
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model).eval()
        scores = {f"heldout/{task}": episode_accuracy(model, run.processor, tasks["with_examples"], limit=PROBE_SAMPLES)
                  for task, tasks in run.heldout.items()}
        model.train()
        log.write(step=step, **scores)
        accelerator.log(scores, step=step)
        bar.write(f"step {step}: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()))
    accelerator.wait_for_everyone()


# ---- the end --------------------------------------------------------------------------------------
def finish(run: Run, step: int, train_seconds: float) -> dict:
    """Save the model, score the saved copy on the held-out split, write summary.json and the loss curve, then push
    (a failed push keeps the results). Scoring reloads the saved folder: the trained model may be sharded over
    processes (FSDP, ZeRO-3), and this also proves that what was written loads."""
    args, accelerator = run.args, run.accelerator
    model_dir = args.output_dir / "model"
    state_dict = accelerator.get_state_dict(run.model)  # gathered on the main process, on every strategy
    summary = {"steps": step, "train_seconds": round(train_seconds, 1), "model_dir": str(model_dir)}
    if run.copying:
        summary["copying"] = run.copying
    # Only this process loads and generates: under ZeRO-3, transformers would make both collectives (zero.Init,
    # generate's synced_gpus) and wait for the other processes forever.
    with hide_zero3_from_transformers(accelerator):
        if accelerator.is_main_process:
            accelerator.unwrap_model(run.model).save_pretrained(model_dir, state_dict=state_dict)
            run.processor.save_pretrained(model_dir)
            record_trained_model(model_dir)
            if run.heldout:
                summary.update(score(model_dir, run.processor, run.heldout))
            write_model_card(model_dir, base_models=[str(args.model)], training=card_training(args, summary))
            (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_curves(StepLog(args.output_dir / "log.jsonl", True, resume_step=step), args.output_dir / "loss.png")
            if args.push_to_hub:  # last: a failed upload keeps everything above
                push_folder(model_dir, args.push_to_hub)
    accelerator.wait_for_everyone()
    return summary


def card_training(args: argparse.Namespace, summary: dict) -> dict:
    """What the model card says about this run: data, settings, results."""
    results = {f"held-out accuracy ({task}, {condition.replace('_', ' ')})": value
               for task, scores in summary.get("tasks", {}).items() for condition, value in scores.items()}
    bundled = f"the bundled toy data {args.data!r} (otter.data.main_job)"
    return {"datasets": [bundled if args.data in BUNDLED_DATA else str(args.data)],
            "settings": {"steps": summary["steps"], "batch size": args.batch_size, "learning rate": args.lr,
                         "trainable": args.trainable, "seed": args.seed},
            "results": {name: value for name, value in results.items() if value is not None}}


def score(model_dir: Path, processor: OtterProcessor, heldout: dict[str, dict[str, Task]]) -> dict:
    """Per task, the accuracy on its held-out samples in each of `task_scores`' conditions; the first task's with
    examples and with blank images are also `heldout_accuracy` and `blank_image_accuracy`."""
    saved = OtterModel.from_pretrained(model_dir).eval()
    tasks = {task: task_scores(saved, processor, conditions) for task, conditions in heldout.items()}
    first = next(iter(tasks.values()))
    return {"heldout_accuracy": first["with_examples"], "blank_image_accuracy": first["blank_images"], "tasks": tasks}


def first_samples(dataset: torch.utils.data.Dataset, count: int) -> list:
    return [dataset[i] for i in range(min(count, len(dataset)))]


def plot_curves(log: StepLog, path: Path) -> None:
    """The training loss and, on a second axis, the held-out probes."""
    losses, scores = log.losses(), log.scores()
    if not losses:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install '.[train]'): no loss curve")
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*losses), color="tab:blue", linewidth=0.8)
    axes.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="otter-train")
    if scores:
        accuracy = axes.twinx()
        for name, curve in scores.items():
            accuracy.plot(*zip(*curve), marker="o", label=name)
        accuracy.set(ylabel="held-out accuracy", ylim=(0, 1))
        accuracy.legend(loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- checkpoints ----------------------------------------------------------------------------------
class Checkpoints:
    """`step-NNNNNN/` folders of accelerate state. Each is written as `.tmp`, listed with its files' sizes in
    `manifest.json`, and renamed when complete, so a kill during a write leaves the previous checkpoint as the
    latest usable one; resuming checks the manifest and falls back to an older checkpoint if files are missing or
    truncated (or fail to load)."""

    MANIFEST = "manifest.json"

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def complete(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def save(self, accelerator: Accelerator, step: int) -> Path:
        final = self.folder / f"step-{step:06d}"
        partial = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
            (partial / self.MANIFEST).write_text(json.dumps(files, indent=1))
            shutil.rmtree(final, ignore_errors=True)  # a resumed run saving the step it resumed from
            os.replace(partial, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
            logger.info("checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def problem(self, checkpoint: Path) -> str | None:
        """What is wrong with a checkpoint's files, by its manifest, or None."""
        manifest = checkpoint / self.MANIFEST
        if not manifest.is_file():
            return f"{manifest} is missing"
        for name, size in json.loads(manifest.read_text()).items():
            path = checkpoint / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
        return None

    def resume(self, accelerator: Accelerator) -> int:
        """Load the newest usable checkpoint; returns its step (0, with a warning, if there is none)."""
        for checkpoint in reversed(self.complete()):
            problem = self.problem(checkpoint)
            if problem is None:
                try:
                    accelerator.load_state(str(checkpoint))
                except Exception as error:  # noqa: BLE001  any unreadable file: try the previous checkpoint
                    problem = f"it does not load ({type(error).__name__}: {error})"
            if problem is None:
                logger.info("resumed from %s", checkpoint)
                return int(checkpoint.name.removeprefix("step-"))
            logger.warning("skipping checkpoint %s: %s", checkpoint, problem)
        logger.warning("--resume: no usable checkpoint in %s, starting from scratch", self.folder)
        return 0


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
        return [(row["step"], row["loss"]) for row in self._rows() if "loss" in row]

    def scores(self) -> dict[str, list[tuple[int, float]]]:
        """The held-out probes (`probe`), by name: `{"heldout/vqa": [(step, accuracy), ...]}`."""
        curves: dict[str, list[tuple[int, float]]] = {}
        for row in self._rows():
            for name, value in row.items():
                if name.startswith("heldout/"):
                    curves.setdefault(name, []).append((row["step"], value))
        return curves

    def _rows(self) -> list[dict]:
        return [json.loads(line) for line in self._lines()]


class StopRequested:
    """SIGTERM (a scheduler preempting the job) asks for a checkpoint and a clean exit after the current step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True


# ---- parameters -----------------------------------------------------------------------------------
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


__all__ = ["Checkpoints", "Run", "finish", "loop", "setup", "train"]
