#!/usr/bin/env python
"""Speed and memory of FlamingoModel against the reference implementation and its peers, on the same weights.

Systems (all built here with random weights, nothing downloaded):
  bare LM       LlamaForCausalLM: the decoder alone, no images (the ceiling)
  ours          FlamingoModel, converted by flamingo.convert from the OpenFlamingo checkpoint below
  OpenFlamingo  open_flamingo 2.0.1 built by its own factory (reference_factory.py beside this script;
                pip install --no-deps open-flamingo==2.0.1 einops-exts)
  IDEFICS       transformers' IdeficsForVisionText2Text at the same sizes (its own random weights)

Workloads: one forward pass; one training step (forward, backward, AdamW) with only the perceiver and the gated
cross-attention trainable, with the next-token loss on every token ("train step") or on the answers only, as Otter's
collator labels them ("train step answers": 3 tokens per image chunk, 9 of 32); greedy `generate` of exactly
--new-tokens tokens with 1 and 3 images, batch 1 and 8. Each system computes its loss its own way: ours with
`labels` and `loss_only=True` (the head at the supervised positions only), the others from their full logits.

How it measures, so that a noisy (shared) machine still gives ratios that repeat:
* every round runs every workload on every system, the systems taking turns (the order rotates from round to
  round), so that a slow spell of the machine hits all systems of a round alike;
* per workload and system: the median and the minimum wall time over the rounds, and the median CPU time of the
  process (user + system, `resource.getrusage`), which time spent descheduled by other programs does not inflate;
* the ratios are paired: each round gives (the other system's time / ours), and the table shows the median of
  those per-round ratios and their spread (min-max over the rounds), for wall and for CPU time;
* one torch thread by default (`--threads`): on a few shared cores, more threads mostly measure the neighbours;
* peak memory of one call above what was resident before it (CPU: peak resident set size, reset through
  /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated), the median of `--memory-passes` calls after the
  rounds (one call's figure moves by a tenth with the state of the heap).

Before timing, ours and OpenFlamingo are checked to be the same model: the largest logit difference and whether
greedy generation gives the same tokens are printed.

    python scripts/benchmark_vs_reference.py                          # 9B proportions scaled down, CPU, fp32
    python scripts/benchmark_vs_reference.py --config tiny --rounds 3
    python scripts/benchmark_vs_reference.py --device cuda --dtype bfloat16   # OpenFlamingo-9B's shape (--config 9b)
    python scripts/benchmark_vs_reference.py --systems ours OpenFlamingo --workloads "train step" --compile

`--compile` runs ours through `torch.compile` (inductor, its defaults), the others eagerly: not a comparison of
implementations, but what compiling adds to ours. The compilation happens in the warm-up round, whose time is printed.

Without CUDA, `--device cuda` says so and exits with status 0 (a skip: nothing was measured).
"""

import argparse
import ctypes
import gc
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flamingo.cli import quiet_third_party

quiet_third_party()  # before torch and transformers: some of the warnings it silences come at their import

import torch  # noqa: E402
from reference_factory import build_open_flamingo, open_gates, release_checkpoint, save_open_clip  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaTokenizerFast  # noqa: E402

from flamingo.convert import convert_checkpoint, open_clip_vision_tower  # noqa: E402

CLIP_NAME = "benchmark-ViT"
SYSTEMS = ["bare LM", "ours", "OpenFlamingo", "IDEFICS"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    lm_hidden: int
    lm_intermediate: int
    lm_layers: int
    lm_heads: int
    base_vocab: int
    cross_attn_every: int
    vit_width: int
    vit_layers: int
    vit_head_width: int
    image_size: int
    patch_size: int
    prompt_tokens: int


# "9b": OpenFlamingo-9B v1's shape (LLaMA-7B, cross-attention every 4 layers, ViT-L/14 at 224 px), for a GPU.
# "scaled-9b": its proportions scaled down for a CPU; the perceiver and the cross-attention blocks keep the factory's
# real widths (8 heads of 64, 64 latents, depth 6).
CONFIGS = {
    "9b": Sizes(4096, 11008, 32, 32, 32000, 4, 1024, 24, 64, 224, 14, prompt_tokens=32),
    "scaled-9b": Sizes(1024, 2752, 8, 8, 32000, 4, 256, 6, 64, 224, 14, prompt_tokens=32),
    "tiny": Sizes(128, 256, 4, 4, 591, 2, 64, 2, 16, 32, 8, prompt_tokens=32),
}


# --------------------------------------------------------------------------------------------------
# Building the systems
# --------------------------------------------------------------------------------------------------
def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A LLaMA-style tokenizer with exactly `vocab_size` entries (the ids are what matters here, not the text)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {f"\u2581w{i}": i for i in range(len(vocab), vocab_size)}
    LlamaTokenizerFast(vocab=vocab, merges=[], legacy=True).save_pretrained(folder)


def save_language_model(folder: Path, sizes: Sizes, generator: torch.Generator) -> None:
    """LLaMA with room for OpenFlamingo's three added tokens, so that the factory's resize keeps every row."""
    config = LlamaConfig(
        vocab_size=sizes.base_vocab + 3, hidden_size=sizes.lm_hidden, intermediate_size=sizes.lm_intermediate,
        num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads, num_key_value_heads=sizes.lm_heads,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    lm = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    lm.save_pretrained(folder)


def build_idefics(sizes: Sizes) -> nn.Module:
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config = IdeficsConfig(
        vocab_size=sizes.base_vocab, additional_vocab_size=3, hidden_size=sizes.lm_hidden,
        intermediate_size=sizes.lm_intermediate, num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads,
        cross_layer_interval=sizes.cross_attn_every, use_resampler=True, alpha_initializer="ones",
        vision_config=dict(embed_dim=sizes.vit_width, image_size=sizes.image_size, patch_size=sizes.patch_size,
                           num_hidden_layers=sizes.vit_layers, num_attention_heads=sizes.vit_width // sizes.vit_head_width,
                           intermediate_size=4 * sizes.vit_width),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=8, resampler_head_dim=64),
    )
    return IdeficsForVisionText2Text(config).eval()


# --------------------------------------------------------------------------------------------------
# A uniform face for the four systems
# --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    input_ids: torch.Tensor  # (B, T) with one <image> token per image
    vision_x: torch.Tensor  # (B, T_img, 1, 3, H, W)
    attended_image: torch.Tensor  # (B, T) 1-based index of the image each token sees, 0 for none
    answer_labels: torch.Tensor  # (B, T) labels on the answers only (-100 elsewhere), unshifted as transformers takes them


class System:
    """One model behind three calls: forward, a training step, greedy generation."""

    def __init__(self, name: str, model: nn.Module, trainable: list[nn.Parameter]):
        self.name, self.model = name, model
        self.optimizer = torch.optim.AdamW(trainable, lr=0.0) if trainable else None  # lr 0: the weights stay equal

    def model_inputs(self, inputs: Inputs) -> dict:
        raise NotImplementedError

    def logits(self, inputs: Inputs) -> torch.Tensor:
        return self.model(**self.model_inputs(inputs), use_cache=False).logits

    def loss(self, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy over the positions whose next label is not -100, from the full logits
        (IDEFICS' own `labels` loss breaks with added vocabulary)."""
        logits = self.logits(inputs)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def train_step(self, inputs: Inputs, labels: torch.Tensor) -> None:
        self.loss(inputs, labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, inputs: Inputs, new_tokens: int) -> torch.Tensor:
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)
        output = self.model.generate(**self.model_inputs(inputs), **options)
        return output[:, inputs.input_ids.shape[1] :]


class BareLM(System):
    def model_inputs(self, inputs: Inputs) -> dict:
        return {"input_ids": inputs.input_ids, "attention_mask": torch.ones_like(inputs.input_ids)}


class Ours(System):
    def model_inputs(self, inputs: Inputs) -> dict:
        return {"input_ids": inputs.input_ids, "vision_x": inputs.vision_x, "attention_mask": torch.ones_like(inputs.input_ids)}

    def loss(self, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        return self.model(**self.model_inputs(inputs), labels=labels, loss_only=True, use_cache=False).loss


class OpenFlamingo(System):
    def model_inputs(self, inputs: Inputs) -> dict:
        return {"vision_x": inputs.vision_x, "lang_x": inputs.input_ids, "attention_mask": torch.ones_like(inputs.input_ids)}

    def logits(self, inputs: Inputs) -> torch.Tensor:
        return self.model(**self.model_inputs(inputs), clear_conditioned_layers=True).logits


class Idefics(System):
    def model_inputs(self, inputs: Inputs) -> dict:
        num_images = inputs.vision_x.shape[1]
        sees = nn.functional.one_hot(inputs.attended_image, num_images + 1)[..., 1:]  # (B, T, T_img)
        return {
            "input_ids": inputs.input_ids,
            "attention_mask": torch.ones_like(inputs.input_ids),
            "pixel_values": inputs.vision_x[:, :, 0],
            "image_attention_mask": sees,
        }


def trainable_parameters(model: nn.Module, *module_names: str) -> list[nn.Parameter]:
    """Freeze everything but the modules whose names contain one of `module_names`."""
    model.requires_grad_(False)
    chosen = [p for name, p in model.named_parameters() if any(part in name for part in module_names)]
    for parameter in chosen:
        parameter.requires_grad_(True)
    return chosen


def build_systems(sizes: Sizes, folder: Path, names: list[str], device: torch.device, dtype: torch.dtype) -> list[System]:
    """The systems in `names`' order, each moved to `device` and `dtype` as soon as it is built (on a GPU, the 9B
    shape would not fit in host memory four times over)."""
    def place(model: nn.Module) -> nn.Module:
        return model.to(device=device, dtype=dtype)

    generator = torch.Generator().manual_seed(0)
    save_tokenizer(folder / "lm", sizes.base_vocab)
    save_language_model(folder / "lm", sizes, generator)
    vision = {"image_size": sizes.image_size, "patch_size": sizes.patch_size, "width": sizes.vit_width,
              "head_width": sizes.vit_head_width, "layers": sizes.vit_layers}
    clip_config, clip_weights = save_open_clip(folder / "open_clip", CLIP_NAME, vision)
    reference, _ = build_open_flamingo(CLIP_NAME, clip_weights, folder / "lm", sizes.cross_attn_every)
    open_gates(reference, generator)
    torch.save(release_checkpoint(reference), folder / "checkpoint.pt")
    reference = place(reference)
    ours, _ = convert_checkpoint(
        folder / "checkpoint.pt", folder / "lm", open_clip_vision_tower(clip_config, clip_weights),
        cross_attn_every_n_layers=sizes.cross_attn_every,
    )
    ours = place(ours.eval())
    builders: dict[str, Callable[[], System]] = {
        "bare LM": lambda: BareLM("bare LM", place(AutoModelForCausalLM.from_pretrained(folder / "lm").eval()), []),
        "ours": lambda: Ours("ours", ours, trainable_parameters(ours, "perceiver", "gated_cross_attn_layer")),
        "OpenFlamingo": lambda: OpenFlamingo(
            "OpenFlamingo", reference, trainable_parameters(reference, "perceiver", "gated_cross_attn_layer")
        ),
        "IDEFICS": lambda: Idefics(
            "IDEFICS", model := place(build_idefics(sizes)),
            trainable_parameters(model, "perceiver_resampler", "gated_cross_attn_layers"),
        ),
    }
    return [builders[name]() for name in names]


ANSWER_TOKENS = 3  # an answer of two tokens and the <|endofchunk|> closing it, per image chunk


def make_inputs(sizes: Sizes, batch: int, num_images: int, media_token_id: int, generator: torch.Generator,
                device: torch.device, dtype: torch.dtype) -> Inputs:
    """Random text with `num_images` <image> tokens spread over the prompt, and random pixels."""
    input_ids = torch.randint(3, sizes.base_vocab, (batch, sizes.prompt_tokens), generator=generator)
    positions = torch.arange(num_images) * (sizes.prompt_tokens // num_images) + 1
    input_ids[:, positions] = media_token_id
    attended_image = (input_ids == media_token_id).cumsum(dim=-1)
    vision_x = torch.randn(batch, num_images, 1, 3, sizes.image_size, sizes.image_size, generator=generator)
    answer_labels = torch.full_like(input_ids, -100)
    for end in [*positions[1:].tolist(), sizes.prompt_tokens]:  # the last 3 tokens of each image's chunk
        answer_labels[:, end - ANSWER_TOKENS : end] = input_ids[:, end - ANSWER_TOKENS : end]
    return Inputs(input_ids.to(device), vision_x.to(device=device, dtype=dtype), attended_image.to(device),
                  answer_labels.to(device))


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    cpu: float  # seconds of CPU time of the whole process (all its threads), user + system


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(call: Callable[[], object], device: torch.device) -> Sample:
    """Wall and CPU time of one call; on a GPU, from an idle device to an idle device."""
    synchronize(device)
    wall, cpu = time.perf_counter(), cpu_seconds()
    call()
    synchronize(device)
    return Sample(time.perf_counter() - wall, cpu_seconds() - cpu)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(call: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above what was resident before it. CUDA: peak allocated memory. CPU: the peak
    resident set size (VmHWM, reset through /proc/self/clear_refs) minus the resident set size before the call;
    free heap pages are first handed back to the system (malloc_trim), so that memory the call reuses from earlier
    calls is counted when it is touched again."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident_kib("VmRSS")
    call()
    return (_resident_kib("VmHWM") - before) / 1024


@dataclass(frozen=True)
class Workload:
    kind: str  # one of WORKLOAD_KINDS
    batch: int
    images: int
    new_tokens: int = 0

    @property
    def name(self) -> str:
        return f"generate {self.new_tokens}" if self.kind == "generate" else self.kind

    def tokens(self, prompt_tokens: int) -> int:
        """Tokens one call processes: the prompt's for a forward pass or a training step, the new ones for generate."""
        return self.batch * (self.new_tokens if self.kind == "generate" else prompt_tokens)

    def applies_to(self, system: System) -> bool:
        return not self.trains or system.optimizer is not None  # the bare LM has nothing to train

    @property
    def trains(self) -> bool:
        return self.kind.startswith("train step")

    def run(self, system: System, inputs: Inputs) -> None:
        if self.trains:
            return system.train_step(inputs, inputs.answer_labels if self.kind == "train step answers" else inputs.input_ids)
        with torch.inference_mode():
            if self.kind == "forward":
                system.logits(inputs)
                return
            tokens = system.generate(inputs, self.new_tokens)
        assert tokens.shape == (self.batch, self.new_tokens), f"{system.name} generated {tuple(tokens.shape)} tokens"


WORKLOAD_KINDS = ["forward", "train step", "train step answers", "generate"]


def workloads(kinds: list[str], new_tokens: int, generate_batches: list[int]) -> list[Workload]:
    """Generation runs twice per shape: `new_tokens` tokens, and 1 token (images, prompt and the first token), so
    that the cost of one more token (the difference) is seen apart from the one-off costs."""
    jobs = [Workload(kind, 8, 3) for kind in WORKLOAD_KINDS[:3] if kind in kinds]
    for batch in generate_batches if "generate" in kinds else []:
        for images in (1, 3):
            jobs += [Workload("generate", batch, images, new_tokens), Workload("generate", batch, images, 1)]
    return jobs


Key = tuple[Workload, str]  # (workload, system name)


def run_rounds(calls: list[tuple[Workload, System, Callable[[], None]]], rounds: int, device: torch.device) -> dict[Key, list[Sample]]:
    """`rounds` samples of every call. Within a round, each workload runs on all its systems back to back, so that
    the per-round ratios compare calls made moments apart; the systems' order rotates from round to round, so that
    none is always the first after another workload (caches, allocator, frequency)."""
    samples: dict[Key, list[Sample]] = {}
    jobs = list(dict.fromkeys(job for job, _, _ in calls))
    for round_index in range(rounds):
        for job in jobs:
            turns = [(system, call) for other, system, call in calls if other == job]
            shift = round_index % len(turns)
            for system, call in turns[shift:] + turns[:shift]:
                samples.setdefault((job, system.name), []).append(measure(call, device))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    return samples


# --------------------------------------------------------------------------------------------------
# Statistics and tables
# --------------------------------------------------------------------------------------------------
def paired_ratio(numerators: list[float], denominators: list[float]) -> str:
    """Median of the per-round ratios, and their min-max over the rounds: "1.12 (1.05-1.18)"."""
    per_round = [a / b for a, b in zip(numerators, denominators, strict=True)]
    if len(per_round) == 1:
        return f"{per_round[0]:.2f}"
    return f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})"


def ratio_cells(times: dict[str, list[float]], name: str) -> list[str]:
    """The bare LM's time / this system's (its speed relative to the decoder alone); this system's time / ours
    (how much faster ours is). Both paired by round."""
    versus_bare = paired_ratio(times["bare LM"], times[name]) if "bare LM" in times else ""
    ours_faster = paired_ratio(times[name], times["ours"]) if "ours" in times and name != "ours" else ""
    return [versus_bare, ours_faster]


def print_table(header: list[str], rows: list[list]) -> None:
    """A Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for cells in rows:
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


def workload_rows(samples: dict[Key, list[Sample]], memory: dict[Key, float], jobs: list[Workload], prompt_tokens: int) -> list[list]:
    rows = []
    for job in jobs:
        wall = {name: [s.wall for s in runs] for (other, name), runs in samples.items() if other == job}
        cpu = {name: [s.cpu for s in runs] for (other, name), runs in samples.items() if other == job}
        for name in wall:
            median = statistics.median(wall[name])
            cpu_faster = ratio_cells(cpu, name)[1]
            rows.append([job.name, job.batch, job.images, name, f"{median:.3f}", f"{min(wall[name]):.3f}",
                         f"{statistics.median(cpu[name]):.3f}", f"{job.tokens(prompt_tokens) / median:.0f}",
                         f"{memory[job, name]:.0f}", *ratio_cells(wall, name), cpu_faster])
    return rows


def per_token_rows(samples: dict[Key, list[Sample]], jobs: list[Workload]) -> list[list]:
    """Decoding alone: (generate N - generate 1) / (N - 1), per round, for wall time."""
    rows = []
    for long in (job for job in jobs if job.kind == "generate" and job.new_tokens > 1):
        short = Workload("generate", long.batch, long.images, 1)
        per_token = {
            name: [(a.wall - b.wall) / (long.new_tokens - 1) for a, b in zip(runs, samples[short, name], strict=True)]
            for (job, name), runs in samples.items() if job == long
        }
        for name, runs in per_token.items():
            rows.append([long.batch, long.images, name, f"{1000 * statistics.median(runs):.1f}", *ratio_cells(per_token, name)])
    return rows


def print_report(samples: dict[Key, list[Sample]], memory: dict[Key, float], jobs: list[Workload], prompt_tokens: int) -> None:
    print("median s / min s: wall time over the rounds; cpu s: median CPU time of the process; tokens/s: tokens per "
          "median wall second (prompt tokens for forward and train step, new tokens for generate); x bare LM: the bare "
          "LM's time / the system's; ours faster x: the system's time / ours. Ratios are per round, paired: median "
          "(min-max over the rounds). peak MiB: median of the memory passes.\n")
    print_table(["workload", "batch", "images", "system", "median s", "min s", "cpu s", "tokens/s", "peak MiB",
                 "x bare LM", "ours faster x", "ours faster x (cpu)"], workload_rows(samples, memory, jobs, prompt_tokens))
    if any(job.kind == "generate" for job in jobs):
        print("\nOne more token (generate N minus generate 1, divided by N - 1, per round): decoding after the images "
              "and the prompt")
        print_table(["batch", "images", "system", "ms per token", "x bare LM", "ours faster x"], per_token_rows(samples, jobs))


def check_same_model(ours: System, reference: System, inputs: Inputs, new_tokens: int) -> None:
    with torch.inference_mode():
        difference = (ours.logits(inputs) - reference.logits(inputs)).abs().max().item()
        same_tokens = torch.equal(ours.generate(inputs, new_tokens), reference.generate(inputs, new_tokens))
    print(f"same weights check: max |logit(ours) - logit(OpenFlamingo)| = {difference:.2e}; "
          f"identical greedy tokens: {'yes' if same_tokens else 'NO'}")


# --------------------------------------------------------------------------------------------------
# Profiling the training step
# --------------------------------------------------------------------------------------------------
def print_train_step_profile(systems: list[System], inputs: Inputs, device: torch.device) -> None:
    """torch.profiler's operators of one training step per system, by self time (after two warm-up steps), and for
    ours the split into the vision tower, the perceiver and the rest, in CPU time (best of two)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for system in (system for system in systems if system.optimizer is not None):
        for _ in range(2):
            system.train_step(inputs, inputs.input_ids)
        with profile(activities=activities) as profiler:
            measure(lambda system=system: system.train_step(inputs, inputs.input_ids), device)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{system.name}: one training step, batch {inputs.input_ids.shape[0]}, {inputs.vision_x.shape[1]} images")
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))
        if system.name == "ours":
            print_phases(system, inputs, device)


def print_phases(ours: System, inputs: Inputs, device: torch.device) -> None:
    model = ours.model
    pixels = inputs.vision_x.flatten(0, 2)
    with torch.no_grad():
        patches = model.vision_encoder(pixel_values=pixels).last_hidden_state[:, 1:].unsqueeze(1)  # (N, F=1, v, D)

    def perceiver_step() -> None:
        model.perceiver(patches).sum().backward()

    def best(call: Callable[[], object]) -> float:
        return min(measure(call, device).cpu for _ in range(2))

    with torch.no_grad():
        vision = best(lambda: model.vision_encoder(pixel_values=pixels))
    perceiver = best(perceiver_step)
    ours.optimizer.zero_grad(set_to_none=True)
    total = best(lambda: ours.train_step(inputs, inputs.input_ids))
    print(f"ours, CPU s of one training step {total:.2f}: vision tower forward {vision:.2f} "
          f"({vision / total:.0%}), perceiver forward + backward {perceiver:.2f} ({perceiver / total:.0%}), "
          f"the rest (language model with cross-attention forward + backward, loss, AdamW) {total - vision - perceiver:.2f} "
          f"({(total - vision - perceiver) / total:.0%})")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="model sizes (default: scaled-9b on CPU, 9b on CUDA)")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=WORKLOAD_KINDS, choices=WORKLOAD_KINDS,
                        help="what to time (default: all; forward and the train steps are batch 8 with 3 images)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generate call (default 64)")
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the most repeatable)")
    parser.add_argument("--memory-passes", type=int, default=3,
                        help="peak-memory calls per workload and system after the rounds; the median is reported (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and pixels (default float32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile ours (not the others) before the warm-up round, which then compiles it")
    parser.add_argument("--profile-train-step", action="store_true",
                        help="instead of the table: torch.profiler's top operators of one training step (batch 8, 3 images)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.memory_passes < 1:
        parser.error(f"--memory-passes must be at least 1, got {args.memory_passes}")
    if args.compile and "ours" not in args.systems:
        parser.error(f"--compile compiles ours, which --systems leaves out ({', '.join(args.systems)})")
    if args.compile and args.profile_train_step:
        parser.error("--compile applies to the timed table, not to --profile-train-step")
    args.config = args.config or ("9b" if args.device == "cuda" else "scaled-9b")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmark_vs_reference: skipped, --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was measured", file=sys.stderr)
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    sizes, device, dtype = CONFIGS[args.config], torch.device(args.device), DTYPES[args.dtype]

    with tempfile.TemporaryDirectory() as folder:
        systems = build_systems(sizes, Path(folder), args.systems, device, dtype)
    by_name = {system.name: system for system in systems}
    media_token_id = by_name["ours"].model.config.media_token_id if "ours" in by_name else sizes.base_vocab + 1
    generator = torch.Generator().manual_seed(1)

    def inputs_of(batch: int, images: int) -> Inputs:
        return make_inputs(sizes, batch, images, media_token_id, generator, device, dtype)

    if {"ours", "OpenFlamingo"} <= by_name.keys():
        check_same_model(by_name["ours"], by_name["OpenFlamingo"], inputs_of(2, 3), 8)

    if args.profile_train_step:
        print_train_step_profile(systems, inputs_of(8, 3), device)
        return
    jobs = workloads(args.workloads, args.new_tokens, args.generate_batches)
    inputs = {shape: inputs_of(*shape) for shape in sorted({(job.batch, job.images) for job in jobs})}
    calls = [(job, system, lambda job=job, system=system: job.run(system, inputs[job.batch, job.images]))
             for job in jobs for system in systems if job.applies_to(system)]
    if args.compile:
        by_name["ours"].model.compile()
    warm_up = time.perf_counter()
    for _, _, call in calls:  # warm-up: first calls allocate and pick kernels (and compile ours with --compile)
        call()
    started = time.perf_counter()
    samples = run_rounds(calls, args.rounds, device)
    memory = {(job, system.name): statistics.median(peak_mib(call, device) for _ in range(args.memory_passes))
              for job, system, call in calls}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nconfig={args.config} {sizes} device={device_name} dtype={args.dtype} rounds={args.rounds} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}{' ours compiled' if args.compile else ''}; warm-up took "
          f"{started - warm_up:.0f} s, timed rounds {time.perf_counter() - started:.0f} s")
    print_report(samples, memory, jobs, sizes.prompt_tokens)


if __name__ == "__main__":
    main()
