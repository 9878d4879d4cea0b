#!/usr/bin/env python
"""The pieces of otter-serve's work, timed in-process at batch 1 and 16 on the scaled-9b config (random weights):
the images (vision tower and perceiver), the language model's prompt pass (with the logits of every position, and
of the last one only, as the server computes them), and one decoding step against the prompt's KV cache, with its
linear layers as the server runs them (`flamingo.kernels.decoding_linears`: FewRowsLinear from 2 rows, with more than one thread) and
with plain `F.linear`.

The prompts are those of scripts/benchmark_serve.py, one image each. Each time is the best of 3 after a warm-up.
`--products` also times each weight shape of a decoding step alone, `F.linear(x, W)` against
`flamingo.kernels.few_rows_linear` (`(W @ xᵀ)ᵀ`), for 1 to 128 rows, and says where their results are bitwise equal.

    python scripts/profile_serve.py --threads 1
    python scripts/profile_serve.py --threads 2 --batches 1 4 16 --products
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(function: Callable[[], object], rounds: int = 3) -> float:
    function()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def time_batch(model, pad: int, inputs: list[dict], size: int) -> dict[str, float]:
    """Seconds of each piece for a batch of `size` rows (the prompts round-robin, left padded as the server does)."""
    import torch

    from flamingo.kernels import decoding_linears
    from flamingo.modeling_flamingo import MediaCache
    from otter.server import left_pad

    batch = left_pad([inputs[i % len(inputs)] for i in range(size)], pad)
    vision_x, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    latents = model.encode_images(vision_x).latents

    def prompt(keep: int):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, media_cache=MediaCache(latents),
                     use_cache=True, logits_to_keep=keep)

    output = prompt(1)
    attended = model.attended_images(torch.cat([ids, torch.full_like(ids[:, :1], pad)], 1))[:, -1:]
    step_mask = torch.cat([mask, mask.new_ones(size, 1)], 1)
    token = output.logits[:, -1].argmax(-1)[:, None]

    def step():  # on a copy: a step appends to the cache it is given
        return model(input_ids=token, attention_mask=step_mask, position_ids=positions[:, -1:] + 1,
                     cache=copy.deepcopy(output.cache), media_cache=output.media_cache, attended_image=attended,
                     use_cache=True)

    def server_step():
        with decoding_linears(size):
            return step()

    copying = best_of(lambda: copy.deepcopy(output.cache))
    return {"images": best_of(lambda: model.encode_images(vision_x)), "every": best_of(lambda: prompt(0)),
            "last": best_of(lambda: prompt(1)), "decode": best_of(server_step, 5) - copying,
            "plain": best_of(step, 5) - copying}


PRODUCT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def product_cell(x, weight) -> str:
    import torch
    import torch.nn.functional as F

    from flamingo.kernels import few_rows_linear

    plain, transposed = best_of(lambda: F.linear(x, weight), 5), best_of(lambda: few_rows_linear(x, weight), 5)
    same = torch.equal(F.linear(x, weight), few_rows_linear(x, weight))
    return f"{plain / transposed:6.2f}{'=' if same else '~'}"


def print_products(model) -> None:
    """Each distinct weight shape of the decoding path, alone: F.linear's time / few_rows_linear's, per row count
    (`=` where the two results are bitwise equal, `~` where they differ by rounding). Weights are read once per call
    from memory as in a step only when they do not fit the caches; here they are reused call after call."""
    import torch

    skipped = ("vision_encoder", "perceiver", "to_kv")  # the images' side: run once per prompt, not per step
    decoding = [module for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not any(part in name for part in skipped)]
    shapes = sorted({tuple(module.weight.shape) for module in decoding}, key=lambda shape: -shape[0] * shape[1])
    print("lone products, F.linear time / (W @ x.T).T time (= bitwise equal results, ~ not):")
    print("weight (out, in)  " + " ".join(f"{rows:>7d}" for rows in PRODUCT_ROWS))
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
        cells = [product_cell(torch.randn(rows, 1, in_features, generator=generator), weight) for rows in PRODUCT_ROWS]
        print(f"{str((out_features, in_features)):17s} " + " ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--products", action="store_true", help="also time each weight shape's product alone")
    args = parser.parse_args(argv)
    import torch
    from benchmark_serve import CONFIGS, prompts, scaled_otter_folder

    from otter.conversation import load_chat_model
    from otter.server import ImageSource, Message, conversation_from_messages

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile-serve-") as folder:
        chat = load_chat_model(str(scaled_otter_folder(CONFIGS["scaled-9b"], Path(folder))))
    model = chat.model.eval()
    inputs = [chat.inputs(conversation_from_messages([Message.model_validate(m) for m in messages], ImageSource(), 8))
              for messages in prompts(8, 224)]
    print(f"scaled-9b, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}; prompt lengths "
          f"{[i['input_ids'].shape[1] for i in inputs]}")
    with torch.inference_mode():
        for size in args.batches:
            ms = {piece: 1000 * seconds for piece, seconds in time_batch(model, chat.processor.pad_token_id, inputs,
                                                                         size).items()}
            print(f"batch {size:2d}: images {ms['images']:.0f} ms ({ms['images'] / size:.0f} per image); prompt pass "
                  f"{ms['every']:.0f} ms with every position's logits, {ms['last']:.0f} ms with the last one's "
                  f"({ms['last'] / size:.0f} per row); decoding step {ms['decode']:.0f} ms "
                  f"({ms['decode'] / size:.0f} per row; with plain F.linear {ms['plain']:.0f} ms, "
                  f"x{ms['plain'] / ms['decode']:.2f})", flush=True)
        if args.products:
            print_products(model)


if __name__ == "__main__":
    main()
