"""Does the copying pretraining teach induction (find the earlier occurrence of this token, continue as it did), or a
shortcut? Trains the tiny Otter's language model alone, as `otter-train --copying-steps` does, and every
`--probe-every` steps scores greedy copying at the pretraining's own layout (otter.data.copying: a sequence of 16, then
its repeat, always 16 tokens later) and with the repeat at other distances (8 tokens, then a gap of random tokens).

    python scripts/experiment_copying.py --layout fixed --steps 300            # otter-train's pretraining
    python scripts/experiment_copying.py --layout varied --steps 1500 --vocabulary 60

`--layout varied` trains on sequences of 4-16 tokens repeated after a gap of 0-16 random tokens, so that only matching
the token's content predicts the repeat. An experiment, not part of the package; the README quotes its runs.
"""

from __future__ import annotations

import argparse
import time

GAPS = (0, 3, 7, 16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--layout", choices=("fixed", "varied"), default="fixed")
    add("--steps", type=int, default=300)
    add("--lr", type=float, default=1e-3)
    add("--batch-size", type=int, default=32)
    add("--vocabulary", type=int, default=0, help="train on token ids below this (0: the whole vocabulary)")
    add("--probe-every", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    return parser.parse_args()


def gapped_batch(vocab_size: int, batch_size: int, generator, *, lengths=(4, 16), max_gap: int = 16,
                 total: int = 48) -> dict:
    """Random ids in [3, vocab_size); in each row a sequence of a random length in `lengths`, a gap of 0..`max_gap`
    random tokens, then the sequence again; only the repeat after its first token is supervised."""
    import torch

    from otter.data.collate import IGNORE_INDEX

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    input_ids = torch.randint(3, vocab_size, (batch_size, total), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(batch_size):
        length, gap = draw(*lengths), draw(0, max_gap)
        start = draw(0, total - 2 * length - gap)
        repeat = start + length + gap
        input_ids[row, repeat : repeat + length] = input_ids[row, start : start + length]
        labels[row, repeat + 1 : repeat + length] = input_ids[row, repeat + 1 : repeat + length]
    return {"input_ids": input_ids, "labels": labels}


def main() -> None:
    args = parse_args()
    import torch

    from flamingo import recipes
    from flamingo.loading import load_model, load_processor
    from otter.data.copying import copying_accuracy, copying_batch, greedy_accuracy
    from otter.training import open_gates

    torch.set_num_threads(args.threads)
    full_vocabulary = load_processor("tiny-otter").tokenizer.vocab_size  # below Otter's added tokens
    vocabulary = args.vocabulary or full_vocabulary
    model = load_model("tiny-otter", seed=args.seed).train()
    open_gates(model)
    recipes.apply(model, "all")
    language_model = model.lang_encoder
    optimizer = torch.optim.AdamW([p for p in language_model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    def gapped_accuracy(vocab_size: int, max_gap: int, probe) -> float:
        return greedy_accuracy(language_model, gapped_batch(vocab_size, 64, probe, lengths=(8, 8), max_gap=max_gap))

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = (copying_batch(vocabulary, args.batch_size, generator) if args.layout == "fixed"
                 else gapped_batch(vocabulary, args.batch_size, generator))
        language_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.probe_every == 0 or step == args.steps:
            probe = torch.Generator().manual_seed(99)
            fixed = copying_accuracy(language_model, vocabulary, probe)
            gapped = " ".join(f"{gap}:{gapped_accuracy(vocabulary, gap, probe):.2f}" for gap in GAPS)
            whole = gapped_accuracy(full_vocabulary, 16, probe)
            print(f"step {step}: at distance 16 {fixed:.2f}, 8 tokens after a gap of up to {gapped}, "
                  f"the whole vocabulary {whole:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
