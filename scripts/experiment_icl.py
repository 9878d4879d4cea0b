#!/usr/bin/env python
"""Variants of the in-context binding task, trained on the tiny Otter from scratch: which part of the task fails?

Trains the model `otter-train` trains (same loading, trainable set, gates, AdamW groups, cosine schedule, collator
and greedy scorer) on episodes drawn on the fly, so that every variant costs only a flag, and every `--probe-every`
steps prints the held-out accuracy of whole names and, per answer position, the teacher-forced accuracy of the query's
answer tokens: the first position shows whether the model picks the right example (binding), the later ones whether
it copies the letters; `copying` is the language model's accuracy on repeated random text (otter.data.copying).

    python scripts/experiment_icl.py --colour-word --induction-steps 1500 --steps 500  # the shipped task's recipe
    python scripts/experiment_icl.py --colour-word --induction-steps 300 --copying-layout fixed --steps 1500  # the first
    python scripts/experiment_icl.py --induction-steps 1500 --steps 1000  # names alone: the pictures must be matched
    python scripts/experiment_icl.py --letters distinct --query identical --vqa-share 0.5
    python scripts/experiment_icl.py --colour-word --supervise queries --lr 3e-3 --queries 4

An episode: `--examples` pictures of one shape each (different shapes and colours), each named by a made-up name
drawn for the episode, then `--queries` pictures asking for the name of the example they match (`--query`). Held-out
episodes draw names from one name in eleven, which training never uses (or, with `--vocabulary N`, from the same N
names as training: only the pairing of names and pictures is new). The README's in-context paragraph quotes runs of
this script; it is an experiment, not part of the package.
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from pathlib import Path

from otter.data.toy_icl import CONSONANTS, ENDINGS, MIDDLES, VOWELS

LETTERS = {
    # The shipped task's letter sets: vowels at two places, d/f/k at two places.
    "shared": (CONSONANTS, VOWELS, MIDDLES, VOWELS, ENDINGS),
    # A letter set of its own per place (no token of one set occurs in another), so a letter's kind says its place.
    "distinct": ("bcdfgnpstw", "aei", "dfhkp", "ouy", "blnsw"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--letters", choices=tuple(LETTERS), default="shared")
    add("--query", choices=("colour", "same", "identical"), default="colour",
        help="colour: the example's colour in another shape (the shipped task); same: its shape and colour, drawn "
        "again; identical: the example's own picture")
    add("--question", default="What is it called?")
    add("--colour-word", action="store_true", help="answers are 'red bakol' instead of 'bakol'")
    add("--colour-word-share", type=float, default=None,
        help="train this share of episodes with the colour word, the rest without; held-out episodes without")
    add("--examples", type=int, default=2)
    add("--queries", type=int, default=2, help="per training episode (held-out episodes ask once)")
    add("--supervise", choices=("all", "queries"), default="all",
        help="all answers (as otter-train), or only the queries' (the examples' names cannot be predicted)")
    add("--vocabulary", type=int, default=0, help="draw every name, held-out too, from this many names")
    add("--episodes", type=int, default=0, help="train on this many episodes drawn once (0: a fresh one every time, "
        "the bundled task has 3000)")
    add("--vqa-share", type=float, default=0.0, help="share of each batch drawn from the bundled toy VQA")
    add("--vqa-from", type=int, default=0,
        help="mix the VQA in only from this step on (a curriculum: the binding first)")
    add("--lr", type=float, default=1e-3)
    add("--copying-batch", type=int, default=32, help="the copying pretraining's batch (otter-train's is 32)")
    add("--copying-layout", choices=("fixed", "gapped"), default="gapped",
        help="gapped: otter-train's (otter.data.copying: the repeat after a gap of random length, which only matching "
        "the tokens' content can copy); fixed: the repeat always 16 tokens later (scripts/experiment_copying.py)")
    add("--gates", type=float, default=0.5,
        help="the cross-attention gates' starting value (otter-train opens them to 0.5)")
    add("--copy-share", type=int, default=0, help="copying sequences trained beside each batch (0: none)")
    add("--induction-steps", type=int, default=0,
        help="first train the language model alone this many steps to copy random text (otter-train's --copying-steps)")
    add("--steps", type=int, default=2000)
    add("--batch-size", type=int, default=16)
    add("--probe-every", type=int, default=250)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    return parser.parse_args()


def name_pools(letters: tuple[str, ...], tokenizer, vocabulary: int) -> tuple[list[str], list[str]]:
    """(training names, held-out names): every name is one token per letter in the tiny tokenizer."""
    names = ["".join(n) for n in itertools.product(*letters)]
    names = [n for n in names if len(tokenizer.tokenize(" " + n)) == len(n)]
    if vocabulary:
        chosen = names[:: max(1, len(names) // vocabulary)][:vocabulary]
        return chosen, chosen
    heldout = set(names[::11])
    return [n for n in names if n not in heldout], sorted(heldout)


class Episodes:
    """Binding episodes drawn from `rng`: examples, then queries naming the example they match."""

    def __init__(self, args: argparse.Namespace, rng: random.Random):
        self.args, self.rng = args, rng

    def picture(self, shape: str, colour: str):
        from otter.data.shapes import Shape, draw_shapes

        rng = self.rng
        return draw_shapes([Shape(shape, colour, (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),
                                  rng.uniform(0.2, 0.36))], 32)

    def names(self, pool: list[str]) -> list[str]:
        """Names that differ in every letter, so that any letter tells which example it comes from."""
        names: list[str] = []
        while len(names) < self.args.examples:
            name = self.rng.choice(pool)
            if all(all(x != y for x, y in zip(name, other, strict=True)) for other in names):
                names.append(name)
        return names

    def __call__(self, pool: list[str], queries: int, colour_word: bool | None = None):
        from otter.data.samples import InstructionSample
        from otter.data.shapes import COLOURS, SHAPES

        args, rng = self.args, self.rng
        colours, shapes = rng.sample(tuple(COLOURS), args.examples), rng.sample(SHAPES, args.examples)
        colour_word = args.colour_word if colour_word is None else colour_word
        answers = [f"{c} {n}" if colour_word else n for c, n in zip(colours, self.names(pool), strict=True)]
        images = [self.picture(s, c) for s, c in zip(shapes, colours, strict=True)]
        chunks = [(args.question, answer) for answer in answers]
        for _ in range(queries):
            target = rng.randrange(args.examples)
            if args.query == "identical":
                images.append(images[target])
            elif args.query == "same":
                images.append(self.picture(shapes[target], colours[target]))
            else:
                images.append(self.picture(rng.choice([s for s in SHAPES if s != shapes[target]]), colours[target]))
            chunks.append((args.question, answers[target]))
        return InstructionSample("episode", chunks, images)


def position_accuracy(model, collate, episodes, answer_id: int, length: int) -> list[float]:
    """Teacher-forced accuracy of each of the query answer's first `length` tokens."""
    import torch

    from otter.data.collate import PreparedSample

    batch = collate([PreparedSample("x", e.training_text(), e.load_images()) for e in episodes])
    with torch.no_grad():
        predicted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    hits = []
    for row, ids in enumerate(batch["input_ids"]):
        start = int((ids == answer_id).nonzero().flatten()[-1])
        hits.append((ids[start + 1 : start + 1 + length] == predicted[row, start : start + length]).float())
    return torch.stack(hits).mean(0).tolist()


def main() -> None:
    args = parse_args()
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from flamingo import recipes
    from flamingo.loading import load_model, load_processor
    from otter.data.collate import IGNORE_INDEX, OtterCollator, PreparedSample
    from otter.data.copying import copying_batch, greedy_accuracy
    from otter.data.main_job import bundled_data
    from otter.evaluate import episode_accuracy, heldout_tasks, task_scores, write_episodes
    from otter.training import open_gates, pretrain_copying

    torch.set_num_threads(args.threads)
    processor = load_processor("tiny-otter")
    vocab_size = processor.tokenizer.vocab_size  # below Otter's added tokens
    train_names, heldout_names = name_pools(LETTERS[args.letters], processor.tokenizer, args.vocabulary)
    print(f"{len(train_names)} training names, {len(heldout_names)} held-out names", flush=True)
    draw = Episodes(args, random.Random(args.seed))
    draw_heldout = Episodes(args, random.Random(12345))
    heldout_colour_word = False if args.colour_word_share is not None else None  # None: as --colour-word says
    heldout = [draw_heldout(heldout_names, 1, heldout_colour_word) for _ in range(100)]
    vqa_train, vqa_heldout = bundled_data("toy", args.seed) if args.vqa_share else (None, None)
    scratch = Path(tempfile.mkdtemp(prefix="experiment-icl-"))  # the held-out samples as flamingo-eval tasks
    heldout_icl = heldout_tasks(heldout, scratch / "icl", "icl")
    probe_vqa = write_episodes([vqa_heldout["vqa"][i] for i in range(64)], scratch / "vqa", "vqa") if vqa_train else None

    model = load_model("tiny-otter", seed=args.seed).train()
    open_gates(model, args.gates)
    recipes.apply(model, "all")
    optimizer = torch.optim.AdamW(recipes.parameter_groups(model, 0.0), lr=args.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(0.03 * args.steps), args.steps)
    collate, answer_id = OtterCollator(processor), processor.tokenizer.convert_tokens_to_ids("<answer>")
    # The held-out answer's tokens: the letters, <|endofchunk|>, and the colour word if any.
    answer_length = 5 + 1 + (args.colour_word and args.colour_word_share is None)

    fixed = [draw(train_names, args.queries) for _ in range(args.episodes)]

    def batch(step: int) -> dict:
        vqa = round(args.batch_size * args.vqa_share) if step >= args.vqa_from else 0
        samples = [vqa_train[draw.rng.randrange(len(vqa_train))] for _ in range(vqa)]
        share = args.colour_word_share
        samples += [fixed[draw.rng.randrange(len(fixed))] if fixed else
                    draw(train_names, args.queries, None if share is None else draw.rng.random() < share)
                    for _ in range(args.batch_size - vqa)]
        inputs = collate([PreparedSample("x", s.training_text(), s.load_images()) for s in samples])
        if args.supervise == "queries":
            for row in range(vqa, args.batch_size):
                first_query = (inputs["input_ids"][row] == answer_id).nonzero().flatten()[args.examples]
                inputs["labels"][row, :first_query] = IGNORE_INDEX
        return inputs

    started = time.perf_counter()
    from experiment_copying import fixed_batch

    copying_layout = fixed_batch if args.copying_layout == "fixed" else copying_batch
    if args.induction_steps:
        copying = pretrain_copying(model, processor, args.induction_steps, lr=args.lr, seed=args.seed,
                                   batch_size=args.copying_batch, make_batch=copying_layout)
        print("copying pretraining:", copying, flush=True)
    copy_generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        model(**batch(step)).loss.backward()
        if args.copy_share:
            model.lang_encoder(**copying_layout(vocab_size, args.copy_share, copy_generator)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % args.probe_every == 0 or step == args.steps:
            model.eval()
            names = episode_accuracy(model, processor, heldout_icl["with_examples"], limit=64)
            positions = position_accuracy(model, collate, heldout[:64], answer_id, answer_length)
            copying = greedy_accuracy(model.lang_encoder, copying_layout(vocab_size, 64, torch.Generator().manual_seed(7)))
            extra = f" copying {copying:.2f}"
            if vqa_train:
                extra += f" vqa {episode_accuracy(model, processor, probe_vqa):.3f}"
            model.train()
            print(f"step {step}: held-out names {names:.3f}, per position "
                  f"{' '.join(f'{p:.2f}' for p in positions)}{extra} ({time.perf_counter() - started:.0f} s)", flush=True)
    print("final, 100 held-out episodes:", task_scores(model.eval(), processor, heldout_icl), flush=True)


if __name__ == "__main__":
    main()
