#!/usr/bin/env python
"""Speed and memory of FlamingoModel against the reference implementation and its peers, on the same weights.

Systems (all built here with random weights, nothing downloaded):
  bare LM       LlamaForCausalLM: the decoder alone, no images (the ceiling)
  ours          FlamingoModel, converted by flamingo.convert from the OpenFlamingo checkpoint below
  OpenFlamingo  open_flamingo 2.0.1 built by its own factory (reference_factory.py beside this script;
                pip install --no-deps open-flamingo==2.0.1 einops-exts)
  IDEFICS       transformers' IdeficsForVisionText2Text at the same sizes (its own random weights)

Workloads: one forward pass; one training step (forward, backward, AdamW) with only the perceiver and the gated
cross-attention trainable; greedy `generate` of exactly --new-tokens tokens with 1 and 3 images, batch 1 and 8.
The systems take turns inside every round, so that noise on a shared machine hits them alike; the table shows
medians over the rounds, the peak memory of the call above what was resident before it (CPU: peak resident set
size, reset through /proc/self/clear_refs; CUDA: peak allocated), and speed ratios.

Before timing, ours and OpenFlamingo are checked to be the same model: the largest logit difference and
whether greedy generation gives the same tokens are printed.

    python scripts/benchmark_vs_reference.py                    # 9B proportions scaled down (the default)
    python scripts/benchmark_vs_reference.py --config tiny --rounds 3
"""

import argparse
import ctypes
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from reference_factory import build_open_flamingo, open_gates, release_checkpoint, save_open_clip
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaTokenizerFast

from flamingo.convert import convert_checkpoint, open_clip_vision_tower

CLIP_NAME = "benchmark-ViT"


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


# OpenFlamingo-9B's proportions (LLaMA-7B, cross-attention every 4 layers, ViT-L/14 at 224 px) scaled down; the
# perceiver and the cross-attention blocks keep the factory's real widths (8 heads of 64, 64 latents, depth 6).
CONFIGS = {
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


class System:
    """One model behind three calls: forward, a training step, greedy generation."""

    def __init__(self, name: str, model: nn.Module, trainable: list[nn.Parameter]):
        self.name, self.model = name, model
        self.optimizer = torch.optim.AdamW(trainable, lr=0.0) if trainable else None  # lr 0: the weights stay equal

    def model_inputs(self, inputs: Inputs) -> dict:
        raise NotImplementedError

    def logits(self, inputs: Inputs) -> torch.Tensor:
        return self.model(**self.model_inputs(inputs), use_cache=False).logits

    def train_step(self, inputs: Inputs) -> None:
        # The same next-token loss for every system (IDEFICS' own `labels` loss breaks with added vocabulary).
        logits = self.logits(inputs)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs.input_ids[:, 1:].flatten())
        loss.backward()
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


def build_systems(sizes: Sizes, folder: Path, names: list[str]) -> list[System]:
    generator = torch.Generator().manual_seed(0)
    save_tokenizer(folder / "lm", sizes.base_vocab)
    save_language_model(folder / "lm", sizes, generator)
    vision = {"image_size": sizes.image_size, "patch_size": sizes.patch_size, "width": sizes.vit_width,
              "head_width": sizes.vit_head_width, "layers": sizes.vit_layers}
    clip_config, clip_weights = save_open_clip(folder / "open_clip", CLIP_NAME, vision)
    reference, _ = build_open_flamingo(CLIP_NAME, clip_weights, folder / "lm", sizes.cross_attn_every)
    open_gates(reference, generator)
    torch.save(release_checkpoint(reference), folder / "checkpoint.pt")
    ours, _ = convert_checkpoint(
        folder / "checkpoint.pt", folder / "lm", open_clip_vision_tower(clip_config, clip_weights),
        cross_attn_every_n_layers=sizes.cross_attn_every,
    )
    ours.eval()
    builders: dict[str, Callable[[], System]] = {
        "bare LM": lambda: BareLM("bare LM", AutoModelForCausalLM.from_pretrained(folder / "lm").eval(), []),
        "ours": lambda: Ours("ours", ours, trainable_parameters(ours, "perceiver", "gated_cross_attn_layer")),
        "OpenFlamingo": lambda: OpenFlamingo(
            "OpenFlamingo", reference, trainable_parameters(reference, "perceiver", "gated_cross_attn_layer")
        ),
        "IDEFICS": lambda: Idefics("IDEFICS", model := build_idefics(sizes), trainable_parameters(model, "perceiver_resampler", "gated_cross_attn_layers")),
    }
    return [builders[name]() for name in names]


def make_inputs(sizes: Sizes, batch: int, num_images: int, media_token_id: int, generator: torch.Generator) -> Inputs:
    """Random text with `num_images` <image> tokens spread over the prompt, and random pixels."""
    input_ids = torch.randint(3, sizes.base_vocab, (batch, sizes.prompt_tokens), generator=generator)
    positions = torch.arange(num_images) * (sizes.prompt_tokens // num_images) + 1
    input_ids[:, positions] = media_token_id
    attended_image = (input_ids == media_token_id).cumsum(dim=-1)
    vision_x = torch.randn(batch, num_images, 1, 3, sizes.image_size, sizes.image_size, generator=generator)
    return Inputs(input_ids, vision_x, attended_image)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def peak_mib(call: Callable[[], object]) -> float:
    """Peak memory of one call above what was resident before it: the peak resident set size (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set size before the call. Free heap pages are first handed back to the
    system (malloc_trim), so that memory the call reuses from earlier calls is counted when it is touched again."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident_kib("VmRSS")
    call()
    return (_resident_kib("VmHWM") - before) / 1024


@dataclass(frozen=True)
class Workload:
    kind: str  # "forward", "train step" or "generate"
    batch: int
    images: int
    new_tokens: int = 0

    @property
    def name(self) -> str:
        return f"generate {self.new_tokens}" if self.kind == "generate" else self.kind

    def applies_to(self, system: System) -> bool:
        return self.kind != "train step" or system.optimizer is not None  # the bare LM has nothing to train

    def run(self, system: System, inputs: Inputs) -> None:
        if self.kind == "train step":
            return system.train_step(inputs)
        with torch.inference_mode():
            if self.kind == "forward":
                system.logits(inputs)
                return
            tokens = system.generate(inputs, self.new_tokens)
        assert tokens.shape == (self.batch, self.new_tokens), f"{system.name} generated {tuple(tokens.shape)} tokens"


def workloads(new_tokens: int, generate_batches: list[int]) -> list[Workload]:
    """Generation runs twice per shape: `new_tokens` tokens, and 1 token (images, prompt and the first token), so
    that the cost of one more token (the difference) is seen apart from the one-off costs."""
    jobs = [Workload("forward", 8, 3), Workload("train step", 8, 3)]
    for batch in generate_batches:
        for images in (1, 3):
            jobs += [Workload("generate", batch, images, new_tokens), Workload("generate", batch, images, 1)]
    return jobs


def check_same_model(ours: System, reference: System, inputs: Inputs, new_tokens: int) -> None:
    with torch.inference_mode():
        difference = (ours.logits(inputs) - reference.logits(inputs)).abs().max().item()
        same_tokens = torch.equal(ours.generate(inputs, new_tokens), reference.generate(inputs, new_tokens))
    print(f"same weights check: max |logit(ours) - logit(OpenFlamingo)| = {difference:.2e}; "
          f"identical greedy tokens: {'yes' if same_tokens else 'NO'}")


def row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def ratios(seconds: dict[str, float], name: str) -> list[str]:
    """The bare LM's time / this system's (its speed relative to the decoder alone); this system's time / ours."""
    versus_bare = f"{seconds['bare LM'] / seconds[name]:.2f}" if "bare LM" in seconds else ""
    ours_faster = f"{seconds[name] / seconds['ours']:.2f}" if "ours" in seconds and name != "ours" else ""
    return [versus_bare, ours_faster]


def print_tables(times: dict[tuple[Workload, str], list[float]], memory: dict[tuple[Workload, str], float], jobs: list[Workload]) -> None:
    print(row(["workload", "batch", "images", "system", "median s", "peak MiB", "x bare LM", "ours faster x"]))
    print(row(["---"] * 8))
    for job in jobs:
        median = {name: statistics.median(runs) for (other, name), runs in times.items() if other == job}
        for name in median:
            print(row([job.name, job.batch, job.images, name, f"{median[name]:.3f}", f"{memory[job, name]:.0f}", *ratios(median, name)]))

    print("\nOne more token (generate N minus generate 1, divided by N - 1): decoding after the images and the prompt")
    print(row(["batch", "images", "system", "ms per token", "x bare LM", "ours faster x"]))
    print(row(["---"] * 6))
    for long in (job for job in jobs if job.kind == "generate" and job.new_tokens > 1):
        short = Workload("generate", long.batch, long.images, 1)
        per_token = {
            name: (statistics.median(runs) - statistics.median(times[short, name])) / (long.new_tokens - 1)
            for (job, name), runs in times.items() if job == long
        }
        for name in per_token:
            print(row([long.batch, long.images, name, f"{1000 * per_token[name]:.1f}", *ratios(per_token, name)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="scaled-9b")
    parser.add_argument("--systems", nargs="+", default=["bare LM", "ours", "OpenFlamingo", "IDEFICS"],
                        choices=["bare LM", "ours", "OpenFlamingo", "IDEFICS"])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generate call (default 64)")
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = CONFIGS[args.config]

    with tempfile.TemporaryDirectory() as folder:
        systems = build_systems(sizes, Path(folder), args.systems)
    by_name = {system.name: system for system in systems}
    media_token_id = by_name["ours"].model.config.media_token_id if "ours" in by_name else sizes.base_vocab + 1
    generator = torch.Generator().manual_seed(1)
    if {"ours", "OpenFlamingo"} <= by_name.keys():
        check_same_model(by_name["ours"], by_name["OpenFlamingo"], make_inputs(sizes, 2, 3, media_token_id, generator), 8)

    jobs = workloads(args.new_tokens, args.generate_batches)
    shapes = {(job.batch, job.images) for job in jobs}
    inputs = {shape: make_inputs(sizes, *shape, media_token_id, generator) for shape in sorted(shapes)}
    calls = [(job, system, lambda job=job, system=system: job.run(system, inputs[job.batch, job.images]))
             for job in jobs for system in systems if job.applies_to(system)]
    for _, _, call in calls:  # warm-up: first calls allocate and pick kernels
        call()
    times: dict[tuple[Workload, str], list[float]] = {}
    for round_index in range(args.rounds):
        for job, system, call in calls:
            times.setdefault((job, system.name), []).append(seconds(call))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    memory = {(job, system.name): peak_mib(call) for job, system, call in calls}

    print(f"\nconfig={args.config} {sizes} rounds={args.rounds} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print("x bare LM: the bare LM's median time / the system's (its speed relative to the decoder alone); "
          "ours faster x: the system's median time / ours\n")
    print_tables(times, memory, jobs)


if __name__ == "__main__":
    main()
