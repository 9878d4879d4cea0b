"""Write the tiny processor folders used by the tests and the tiny models.

* `flamingo/assets/tiny-tokenizer/`: the base tokenizer from `make_tiny_tokenizer.py`, without Flamingo's special
  tokens (what a user's LLaMA tokenizer is to the published checkpoints).
* `flamingo/assets/tiny-flamingo/` and `otter/assets/tiny-otter/`: processors built from it with `from_base_tokenizer` (so the special
  tokens get the ids the add order gives them) and a `CLIPImageProcessor` for 32x32 images.

The model `config.json` files in those folders are written elsewhere and left untouched. The output is deterministic:
two runs give byte-identical files.

Usage: python scripts/make_tiny_assets.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_tiny_tokenizer import build_tokenizer  # noqa: E402  (sibling script)
from transformers import CLIPImageProcessor, PreTrainedTokenizerBase  # noqa: E402

from flamingo.processing_flamingo import FlamingoProcessor  # noqa: E402
from otter.processing_otter import OtterProcessor  # noqa: E402

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROCESSORS = {"tiny-flamingo": FlamingoProcessor, "tiny-otter": OtterProcessor}


def tiny_image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP preprocessing (bicubic resize of the shortest edge, center crop, CLIP mean/std) at the tiny size."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def write_processor(
    name: str, processor_class: type[FlamingoProcessor], base: PreTrainedTokenizerBase, out: Path, image_size: int
) -> None:
    processor = processor_class.from_base_tokenizer(base, image_processor=tiny_image_processor(image_size))
    processor.save_pretrained(out / name)
    added = {token: i for token, i in processor.tokenizer.get_added_vocab().items() if i >= len(base)}
    logger.info(f"{out / name}: {len(processor.tokenizer)} tokens (base {len(base)}), added tokens {added}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images the processors make")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    base = build_tokenizer()
    base.save_pretrained(ROOT / "flamingo/assets/tiny-tokenizer")
    logger.info(f"flamingo/assets/tiny-tokenizer: base tokenizer, {len(base)} tokens")
    for name, processor_class in PROCESSORS.items():
        write_processor(name, processor_class, base, ROOT / processor_class.config_class.model_type / "assets",
                        args.image_size)


if __name__ == "__main__":
    main()
