"""Write `otter/assets/tiny-otter-copier/`: the tiny Otter's language model, pretrained to copy text.

Otter starts from a pretrained LLaMA, which already finds earlier text and continues it (induction); the tiny Otter's
language model is random until it learns to copy (otter.data.copying). This script runs that pretraining once, as
`otter-train --copying-steps 1500` does at the start of a run, and ships the result, so that the main job
(`otter-train --data toy-mixture`, and `toy-icl`) starts from it instead of spending two to three minutes on it:

    model.safetensors   the language model's weights, stock LLaMA names (`FlamingoModel.language_model_state_dict`)
    record.json         how it was made (steps, learning rate, seed, seconds) and its copying accuracy

Deterministic at one thread (`OMP_NUM_THREADS=1`, the way the shipped copy was made); other thread counts change the
last digits of the weights, not the accuracy.

Usage: OMP_NUM_THREADS=1 python scripts/make_tiny_copier.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flamingo.loading import load_model, load_processor  # noqa: E402
from otter.data.copying import LEARNING_RATE  # noqa: E402
from otter.defaults import COPYING_STEPS, SHIPPED_COPIER, TINY_OTTER  # noqa: E402
from otter.training import pretrain_copying  # noqa: E402

logger = logging.getLogger(__name__)
SEED = 0  # otter-train's default --seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=COPYING_STEPS)
    parser.add_argument("--out", type=Path, default=SHIPPED_COPIER)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = load_model(TINY_OTTER, seed=SEED).train()
    record = pretrain_copying(model, load_processor(TINY_OTTER), args.steps, seed=SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.contiguous() for name, tensor in model.language_model_state_dict().items()}
    save_file(weights, args.out / "model.safetensors", metadata={"format": "pt"})
    record |= {"model": TINY_OTTER, "lr": LEARNING_RATE, "seed": SEED, "threads": torch.get_num_threads()}
    (args.out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("%s: %s", args.out, record)


if __name__ == "__main__":
    main()
