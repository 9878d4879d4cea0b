"""Build a tiny LLaMA-style tokenizer, offline and deterministically.

The tiny test models need a real tokenizer with the same mechanics as LLaMA's (Metaspace pre-tokenizer, BPE with
byte fallback, `<unk>`/`<s>`/`</s>` at ids 0/1/2, the 256 byte tokens at 3..258, BOS prepended, no EOS), but small
enough to keep embedding matrices tiny. It is trained on a fixed built-in corpus that covers the vocabulary of the
toy visual-QA data (colours, shapes, counts, positions, sizes and the Otter/OpenFlamingo prompt words), so prompts
of that data tokenize into whole words rather than bytes.

The Flamingo special tokens (`<|endofchunk|>`, `<image>`, ...) are deliberately NOT part of this tokenizer: like the
published checkpoints, they are appended by `FlamingoProcessor.from_base_tokenizer`, which fixes their ids.

Usage: python scripts/make_tiny_tokenizer.py --out flamingo/assets/tiny-tokenizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast

logger = logging.getLogger(__name__)

BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Upper bound for the trained BPE vocabulary (base specials + alphabet + merges). The corpus runs out of merges
# before this, so the result is "every corpus word is one token" and the exact size is set by the corpus.
TRAINER_VOCAB_SIZE = 1000

COLOURS = tuple("red green blue yellow purple orange white black pink brown gray grey cyan".split())
SHAPES = tuple("circle square triangle star cross ring rectangle diamond".split())
COUNT_WORDS = tuple("zero one two three four five six seven eight nine ten".split())
POSITIONS = (
    *"left right top bottom center centre upper lower corner middle".split(),
    *(f"{v} {h} corner" for v in ("top", "bottom") for h in ("left", "right")),
    *(f"{v} {h}" for v in ("upper", "lower") for h in ("left", "right")),
)
SIZES = ("small", "large", "big", "tiny")


def plural(shape: str) -> str:
    """English plural of a shape name ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith("s") else "s")


def build_corpus() -> list[str]:
    """The fixed training corpus: every vocabulary word in the sentence frames it appears in, in a fixed order."""
    lines = [
        "What colour is the shape? What color is the shape?",
        "How many shapes are there? How many objects are in the image?",
        "What shape is it? What is the shape in the picture?",
        "Where is the shape? Is there a shape in the image? yes. no.",
        "a photo of a shape. an image of a shape. a picture of shapes on a background.",
        "User: What is in the image? GPT: answer",
        "the answer is yes. the answer is no. the answer is",
        "Question: what is in this image? Answer: Output: Describe the image. Caption:",
        "There are no shapes. There is one shape. There are two shapes. It is a shape.",
        "The quick brown fox jumps over the lazy dog. A cat and a dog.",
    ]
    for colour, shape in itertools.product(COLOURS, SHAPES):
        lines.append(f"a photo of a {colour} {shape}. an image of a {colour} {shape}. the {shape} is {colour}.")
        lines.append(f"User: Is there a {colour} {shape}? GPT: yes. User: What colour is the {shape}? GPT: {colour}")
    for size, shape in itertools.product(SIZES, SHAPES):
        lines.append(f"there is a {size} {shape} and two {size} {plural(shape)}. The {shape} is {size}.")
    for position, shape in itertools.product(POSITIONS, SHAPES):
        lines.append(f"Where is the {shape}? The {shape} is in the {position}. It is at the {position}.")
    for number, word in enumerate(COUNT_WORDS):
        lines.append(f"How many shapes are there? {word}. There are {word} shapes. {number} {word}")
    lines.append(" ".join(str(n) for n in range(100)))
    return lines


def train_pieces(corpus: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a Metaspace BPE on `corpus`; returns its pieces in id order (without the base specials) and merges."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Training splits off punctuation and single digits so that, as in LLaMA, pieces never glue a word to a "?" or
    # ".", and numbers are spelt digit by digit. The saved tokenizer keeps LLaMA's plain Metaspace: with no merge
    # across those boundaries, it tokenizes the same way.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINER_VOCAB_SIZE, special_tokens=list(BASE_SPECIAL_TOKENS), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in BASE_SPECIAL_TOKENS]
    # tokenizers serializes merges as pairs or as "a b" strings depending on its version; LlamaTokenizer needs tuples.
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    return pieces, merges


def build_tokenizer() -> LlamaTokenizerFast:
    """LLaMA layout: `<unk>` 0, `<s>` 1, `</s>` 2, `<0x00>`..`<0xFF>` 3..258, then the trained pieces."""
    pieces, merges = train_pieces(build_corpus())
    vocab = {token: i for i, token in enumerate(BASE_SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    # legacy=True: a "▁" is prepended to the text after every special token ("<image>User" -> "<image>", "▁User"),
    # as the sentencepiece-based LLaMA tokenizers that OpenFlamingo and Otter were trained with did. transformers 5's
    # default (legacy=False) prepends it only at the start of the text.
    tokenizer = LlamaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=True)
    # LlamaTokenizer rebuilds its pre-tokenizer from `legacy` when loaded, but does not save it by itself.
    tokenizer.init_kwargs["legacy"] = True
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer files into")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(args.out)
    logger.info(f"Saved a tokenizer with {len(tokenizer)} tokens to {args.out}")


if __name__ == "__main__":
    main()
