#!/usr/bin/env python
"""Throughput of `otter-serve` under concurrent streaming clients, with the real `openai` client on loopback.

The server runs as its own process (`python -m otter.serve`) on 127.0.0.1 with an untrained model (random weights,
nothing downloaded): the shipped tiny Otter, or OpenFlamingo-9B's proportions scaled down (the `scaled-9b` sizes of
benchmark_vs_reference.py, here as an Otter config with a 32000-token LLaMA-style tokenizer and 224 px images).
For each level of concurrency (1, 4, 16 clients), every client sends its share of `--requests` streaming requests
one after the other (greedy, exactly `--new-tokens` tokens: an untrained model never ends its answer early); the
table shows requests/s, generated tokens/s, the p50/p95 latency of a request (first byte sent to last chunk),
and the server's prompt batches (`joins`, each joining the running batch) and decoding steps.

Every answer is checked against the answer to the same prompt at one client, which the server answered alone:
batching must not change a greedy answer. The last line is the speed-up of 16 clients over one at a time:

    python scripts/benchmark_serve.py                    # scaled-9b
    python scripts/benchmark_serve.py --config tiny --requests 16
    ...
    serve_throughput_ratio_16_vs_1=...
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

# (sibling script; importing it also silences known third-party warnings, before torch is imported)
from benchmark_vs_reference import CONFIGS, Sizes, save_tokenizer  # noqa: E402

QUESTIONS = ["What colour is the shape?", "What shape is it?", "Where is the shape?", "Describe the picture.",
             "Is there a circle?", "How many shapes are there?", "What is in the image?", "Is it red?"]
SHAPES = [("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("cross", "green")]


# ---- the model folder -----------------------------------------------------------------------------
def scaled_otter_folder(sizes: Sizes, folder: Path) -> Path:
    """An Otter config of `sizes` with its processor, no weights: the server builds a seeded random model."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    from otter import OtterConfig, OtterProcessor

    save_tokenizer(folder / "base-tokenizer", sizes.base_vocab)
    processor = OtterProcessor.from_base_tokenizer(folder / "base-tokenizer", image_processor=CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size}, crop_size={"height": sizes.image_size, "width": sizes.image_size}))
    model = folder / "model"
    processor.save_pretrained(model)
    text = LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=sizes.lm_hidden,
                       intermediate_size=sizes.lm_intermediate, num_hidden_layers=sizes.lm_layers,
                       num_attention_heads=sizes.lm_heads, num_key_value_heads=sizes.lm_heads, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=sizes.vit_width, intermediate_size=4 * sizes.vit_width,
                              num_hidden_layers=sizes.vit_layers,
                              num_attention_heads=sizes.vit_width // sizes.vit_head_width,
                              image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_act="quick_gelu")
    config = OtterConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         cross_attn_every_n_layers=sizes.cross_attn_every,
                         **{field: processor.tokenizer.convert_tokens_to_ids(token)
                            for field, token in OtterConfig.token_id_fields.items()})
    config.save_pretrained(model)
    return model


# ---- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m otter.serve` on loopback, until the `with` block ends."""

    def __init__(self, model: str, max_batch_size: int, new_tokens: int, threads: int | None):
        self.threads = threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "otter.serve", "--model", model, "--port", str(self.port),
                        "--max-batch-size", str(max_batch_size), "--max-queue", "256",
                        "--max-new-tokens-limit", str(new_tokens)]

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"otter-serve exited: {self.process.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("otter-serve did not start within 10 minutes")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def cpu_seconds(self) -> float | None:
        """The server process's CPU time so far, user and system, all threads (Linux /proc; None elsewhere). Unlike
        wall-clock time it leaves out the time other programs on a shared machine take the cores."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---- the clients ----------------------------------------------------------------------------------
def prompts(count: int, image_size: int) -> list[list[dict]]:
    from otter.client import image_url
    from otter.data.shapes import draw_shape

    return [[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(draw_shape(*SHAPES[i % len(SHAPES)], image_size))}},
        {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}] for i in range(count)]


@dataclass
class Result:
    prompt: int
    answer: str
    tokens: int
    seconds: float


def ask(client, model: str, messages: list[dict], new_tokens: int) -> tuple[str, int]:
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, tokens = "", 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, tokens


def run_level(client, model: str, messages: list[list[dict]], clients: int, requests: int,
              new_tokens: int) -> tuple[list[Result], float]:
    """`requests` requests from `clients` threads, each sending its share one after another."""
    results: list[Result] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(first: int) -> None:
        for index in range(first, requests, clients):
            start = time.perf_counter()
            try:
                answer, tokens = ask(client, model, messages[index % len(messages)], new_tokens)
            except Exception as error:  # reported after the level
                errors.append(error)
                return
            with lock:
                results.append(Result(index % len(messages), answer, tokens, time.perf_counter() - start))

    threads = [threading.Thread(target=client_loop, args=(first,)) for first in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at {clients} clients: {errors[0]!r}")
    return results, time.perf_counter() - start


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


BREAKDOWN = ("image_seconds", "prompt_seconds", "decode_seconds", "row_seconds", "images_encoded", "prompt_positions",
             "decoded_rows", "generate_calls", "decode_steps")


def print_breakdown(levels: dict[int, tuple[dict, float]]) -> None:
    """Where the server's worker spent each level: images (vision tower and perceiver), the language model's prompt
    passes, decoding steps and the rows' own work after each step, in seconds and per unit; `cpu` is the server
    process's CPU time (all its threads), which a shared machine inflates less than the wall-clock columns."""
    print("where the server's time went (seconds; per image, per prompt token run, per decoding step and row):")
    print(f"{'clients':>7} {'wall':>6} {'cpu':>6} {'images':>7} {'prompts':>8} {'decode':>7} {'rows':>6} "
          f"{'ms/image':>9} {'ms/token':>9} {'ms/step':>8} {'rows/step':>9} {'ms/row-step':>11}")
    for clients, (spent, wall) in levels.items():
        steps, rows = max(spent["decode_steps"], 1), max(spent["decoded_rows"], 1)
        print(f"{clients:>7} {wall:>6.1f} {spent['cpu_seconds']:>6.1f} {spent['image_seconds']:>7.1f} {spent['prompt_seconds']:>8.1f} "
              f"{spent['decode_seconds']:>7.1f} {spent['row_seconds']:>6.2f} "
              f"{1000 * spent['image_seconds'] / max(spent['images_encoded'], 1):>9.0f} "
              f"{1000 * spent['prompt_seconds'] / max(spent['prompt_positions'], 1):>9.1f} "
              f"{1000 * spent['decode_seconds'] / steps:>8.0f} {rows / steps:>9.1f} "
              f"{1000 * spent['decode_seconds'] / rows:>11.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["scaled-9b", "tiny"], default="scaled-9b")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (all levels send the same)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts, sent round-robin")
    parser.add_argument("--threads", type=int, help="the server's torch threads (OMP_NUM_THREADS; default: inherited)")
    args = parser.parse_args(argv)
    from openai import OpenAI

    with tempfile.TemporaryDirectory(prefix="benchmark-serve-") as folder:
        sizes = CONFIGS[args.config]
        model_dir = "tiny-otter" if args.config == "tiny" else str(scaled_otter_folder(sizes, Path(folder)))
        with ServerProcess(model_dir, max(args.clients), args.new_tokens, args.threads) as server:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
            model = client.models.list().data[0]
            messages = prompts(args.prompts, model.model_extra["image_size"])
            ask(client, model.id, messages[0], 2)  # warm-up: first-call costs are not part of any level
            alone = {index: ask(client, model.id, messages[index], args.new_tokens)[0]
                     for index in range(len(messages))}
            print(f"otter-serve, {args.config} (random weights), {args.requests} streaming requests per level, "
                  f"{args.new_tokens} new tokens each, greedy, {server.health()['torch_threads']} torch thread(s), "
                  f"load average {os.getloadavg()[0]:.1f} before the first level")
            print(f"{'clients':>7} {'requests/s':>11} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'joins':>6} "
                  f"{'steps':>6} {'identical':>9}")
            throughput, identical_everywhere, levels = {}, True, {}
            for clients in args.clients:
                before, cpu_before = server.health(), server.cpu_seconds()
                results, seconds = run_level(client, model.id, messages, clients, args.requests, args.new_tokens)
                after, cpu_after = server.health(), server.cpu_seconds()
                spent = {key: after[key] - before[key] for key in BREAKDOWN}
                spent["cpu_seconds"] = cpu_after - cpu_before if cpu_before is not None else float("nan")
                levels[clients] = (spent, seconds)
                identical = all(result.answer == alone[result.prompt] for result in results)
                identical_everywhere &= identical
                latencies = [result.seconds for result in results]
                throughput[clients] = len(results) / seconds
                print(f"{clients:>7} {throughput[clients]:>11.2f} {sum(r.tokens for r in results) / seconds:>9.1f} "
                      f"{percentile(latencies, 0.5):>7.2f} {percentile(latencies, 0.95):>7.2f} "
                      f"{spent['generate_calls']:>6} {spent['decode_steps']:>6} {str(identical):>9}", flush=True)
    print_breakdown(levels)
    print(f"load average {os.getloadavg()[0]:.1f} after the last level")
    print(f"greedy_answers_identical={identical_everywhere}")
    if 1 in throughput and 16 in throughput:
        # Per request, the server's CPU time at one client over that at 16: about what the throughput ratio would
        # be on cores the server had to itself (a check on a ratio measured while the machine is shared).
        cpu = {clients: spent["cpu_seconds"] / args.requests for clients, (spent, _) in levels.items()}
        print(f"server_cpu_seconds_per_request: 1 client {cpu[1]:.2f}, 16 clients {cpu[16]:.2f} "
              f"(ratio {cpu[1] / cpu[16]:.2f})")
        print(f"serve_throughput_ratio_16_vs_1={throughput[16] / throughput[1]:.2f}")
    if not identical_everywhere:
        raise SystemExit("batched greedy answers differ from the answers given alone")


if __name__ == "__main__":
    main()
