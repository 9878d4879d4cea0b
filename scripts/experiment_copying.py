"""Does the copying pretraining teach induction (find the earlier occurrence of this token, continue as it did), or a
shortcut? Trains the tiny Otter's language model alone, as `otter-train --copying-steps` does, and every
`--probe-every` steps scores greedy copying at distance 16 (a sequence of 16, then its repeat right after it) and with
8 tokens repeated after a gap of random tokens (otter.data.copying's layout).

    python scripts/experiment_copying.py --layout fixed --steps 300    # the first pretraining: the repeat right after
    python scripts/experiment_copying.py --layout gapped --steps 1500  # otter-train's: after a random gap
    python scripts/experiment_copying.py --layout gapped --steps 1500 --vocabulary 60

`--layout fixed` trains on 16 random tokens said twice in a row, the layout `otter-train` first shipped; `--layout
gapped` on otter.data.copying's (sequences of 4-16 tokens repeated after a gap of 0-16 random tokens), where only
matching the token's content predicts the repeat. An experiment, not part of the package; the README quotes its runs.
"""

from __future__ import annotations

import argparse
import time

GAPS = (0, 3, 7, 16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--layout", choices=("fixed", "gapped"), default="gapped")
    add("--steps", type=int, default=300)
    add("--lr", type=float, default=1e-3)
    add("--batch-size", type=int, default=32)
    add("--vocabulary", type=int, default=0, help="train on token ids below this (0: the whole vocabulary)")
    add("--probe-every", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    return parser.parse_args()


def fixed_batch(vocab_size: int, batch_size: int, generator, length: int = 16) -> dict:
    """The first pretraining's layout: a sequence of `length` random ids in [3, vocab_size), then its repeat right
    after it; the repeat after its first token is supervised."""
    import torch

    from otter.data.collate import IGNORE_INDEX

    tokens = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    input_ids = torch.cat([tokens, tokens], dim=1)  # (batch, 2 * length)
    labels = input_ids.clone()
    labels[:, : length + 1] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def main() -> None:
    args = parse_args()
    import torch

    from flamingo import recipes
    from flamingo.loading import load_model, load_processor
    from otter.data.copying import copying_batch, greedy_accuracy
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
        return greedy_accuracy(language_model, copying_batch(vocab_size, 64, probe, lengths=(8, 8), max_gap=max_gap))

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = (fixed_batch if args.layout == "fixed" else copying_batch)(vocabulary, args.batch_size, generator)
        language_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.probe_every == 0 or step == args.steps:
            probe = torch.Generator().manual_seed(99)
            fixed = greedy_accuracy(language_model, fixed_batch(vocabulary, 64, probe))
            gapped = " ".join(f"{gap}:{gapped_accuracy(vocabulary, gap, probe):.2f}" for gap in GAPS)
            whole = gapped_accuracy(full_vocabulary, 16, probe)
            print(f"step {step}: at distance 16 {fixed:.2f}, 8 tokens after a gap of up to {gapped}, "
                  f"the whole vocabulary {whole:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
