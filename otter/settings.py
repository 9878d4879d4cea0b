"""The command-line flags that Otter's apps share, and the generation settings a user may tune; no torch here, so
that every command's `--help` answers at once."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from flamingo.arguments import int_at_least
from otter.defaults import describe_default

DTYPES = ("float32", "bfloat16", "float16")
UNTRAINED_MAX_NEW_TOKENS = 32  # an untrained model never writes <|endofchunk|>, so it always runs to the limit


positive_int = int_at_least(1)


def add_model_arguments(parser: argparse._ActionsContainer) -> None:  # a parser or an argument group
    parser.add_argument("--model", help=f"hub id, folder or shipped config name (default: {describe_default()})")
    parser.add_argument("--tokenizer", help="base tokenizer to add Otter's tokens to (for checkpoints without one)")
    parser.add_argument("--device-map", help='e.g. "auto" to shard over the visible GPUs')
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--load-in-8bit", action="store_true",
                        help="bitsandbytes int8 weights for the language model's layers")


def add_generation_arguments(parser: argparse._ActionsContainer) -> None:
    defaults = GenerationSettings()
    parser.add_argument("--max-new-tokens", type=positive_int, help=f"default {defaults.max_new_tokens}, or "
                        f"{UNTRAINED_MAX_NEW_TOKENS} for an untrained model (whose answers never end)")
    parser.add_argument("--num-beams", type=positive_int, default=defaults.num_beams,
                        help="1 streams the answer token by token")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size)
    parser.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy/beam search")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)


@dataclass(frozen=True)
class GenerationSettings:
    """What the user may tune. The defaults are Otter's demo settings (beam search of 3, no repeated 3-grams, up to
    512 tokens); `TextIteratorStreamer` cannot follow beam search, so answers stream token by token only with
    `num_beams=1` and otherwise appear when complete."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 3
    no_repeat_ngram_size: int = 3

    @classmethod
    def from_args(cls, args: argparse.Namespace, trained: bool = True) -> GenerationSettings:
        """The settings of `add_generation_arguments`; an unset `--max-new-tokens` is short for untrained models."""
        values = {name: getattr(args, name) for name in asdict(cls())}
        if values["max_new_tokens"] is None:
            values["max_new_tokens"] = cls.max_new_tokens if trained else UNTRAINED_MAX_NEW_TOKENS
        return cls(**values)

    @property
    def streams(self) -> bool:
        return self.num_beams == 1

    def generate_kwargs(self) -> dict:
        """`generate` arguments; temperature and top-p only when sampling (transformers warns otherwise)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


__all__ = ["DTYPES", "GenerationSettings", "add_generation_arguments", "add_model_arguments", "positive_int"]
