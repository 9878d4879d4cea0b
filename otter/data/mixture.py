"""Mixtures of instruction datasets sampled by weight, described in a YAML or JSON file.

    seed: 0                  # optional: seeds the sampling plan and the subsets
    length: 4000             # optional: samples per epoch (default: the components' sizes summed)
    datasets:                # or the file is just this list
      - type: mimicit        # mimicit | multi_instruct
        instructions_path: toy/train/instructions.json     # *_path: relative to this file
        images_path: toy/train/images.json
        train_config_path: toy/train/train_config.json
        weight: 3            # optional sampling weight (default: the component's size, as in Otter)
        num_samples: 1000    # optional: use a seeded random subset of this many samples (-1: all)
        num_in_context: 2    # any other key is passed to the dataset's constructor
      - type: multi_instruct
        tsv_path: vqa.tsv
        weight: 1
      - type: mimicit         # a video dataset: each instruction's image_ids are the frames of one clip
        instructions_path: DC/DC_instructions.json
        images_path: DC/DC.json
        clips: true           # default: by the ids' MIMIC-IT prefix (DC, E4D, FunQA, SD, SN, TVC)
        num_frames: 8         # optional: frames kept per clip, evenly spaced, first and last included

Image and video datasets mix freely: a batch with clips stretches its images to the clips' frames (see
`flamingo.video`). Index `i` of the mixture is fixed by the seed: which component it comes from is drawn with probability
proportional to the weights, and each component is walked through in a seeded random order (reshuffled each time it
is exhausted), so the same file gives the same samples in every process.
`otter-train` batches a mixture with `TaskBatches`: each batch from one component, as Otter trains.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .mimicit import MimicItDataset
from .multi_instruct import MultiInstructDataset
from .samples import InstructionSample

logger = logging.getLogger(__name__)

DATASET_TYPES = {"mimicit": MimicItDataset, "multi_instruct": MultiInstructDataset}


class WeightedMixture(torch.utils.data.Dataset):
    """A fixed, seeded sampling plan over component datasets.

    Args:
        datasets: the components.
        weights: one positive sampling weight per component; None: the number of samples it may draw from.
        length: samples per epoch (default: the components' usable sizes summed).
        num_samples: per component, how many of its samples may be drawn (a seeded random subset; None or -1: all).
        seed: seeds the plan.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float | None],
        length: int | None = None,
        num_samples: Sequence[int | None] | None = None,
        seed: int = 0,
    ):
        if not datasets or len(weights) != len(datasets):
            raise ValueError(f"need one weight per dataset, got {len(weights)} for {len(datasets)}")
        self.datasets = list(datasets)
        generator = torch.Generator().manual_seed(seed)
        pools = [_pool(len(d), n, generator) for d, n in zip(self.datasets, num_samples or [None] * len(datasets))]
        weights = [len(pool) if w is None else w for w, pool in zip(weights, pools)]
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive, got {weights}")
        length = sum(len(pool) for pool in pools) if length is None else length
        if length <= 0:
            raise ValueError(f"a mixture needs a positive length, got {length}")
        probabilities = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.components = torch.multinomial(probabilities, length, replacement=True, generator=generator)
        self.items = torch.empty_like(self.components)
        for c, pool in enumerate(pools):
            where = (self.components == c).nonzero().flatten()
            self.items[where] = _walk(pool, len(where), generator)

    def __len__(self) -> int:
        return len(self.components)

    def __getitem__(self, index: int) -> InstructionSample:
        return self.datasets[self.components[index]][int(self.items[index])]

    @property
    def bad_rows(self) -> Counter[str]:
        """The components' skipped rows, summed by reason."""
        return sum((getattr(d, "bad_rows", Counter()) for d in self.datasets), Counter())

    def summary(self) -> str:
        """The components' summaries and how many draws each got."""
        draws = torch.bincount(self.components, minlength=len(self.datasets)).tolist()
        lines = [f"mixture: {len(self)} samples per epoch"]
        for dataset, count in zip(self.datasets, draws, strict=True):
            described = (
                dataset.summary() if hasattr(dataset, "summary") else f"{type(dataset).__name__} of {len(dataset)}"
            )
            lines.append(f"  {count} draws from {described}")
        return "\n".join(lines)


class TaskBatches(torch.utils.data.Sampler[int]):
    """The indices of a `WeightedMixture` (or of a dataset that wraps one index for index) ordered so that each run
    of `batch_size` comes from one component, as Otter trains one dataset's batch at a time: a batch of short
    questions is not padded to the length and image count of the longest task (in the main job, a mixed batch of
    16 cost 1.3 times one of VQA alone). Every sample of the epoch is used: each component's remainder goes into
    mixed batches, and the one partial batch comes last (a `drop_last` loader drops it). The order is seeded and
    differs from epoch to epoch (`set_epoch`, which accelerate calls)."""

    def __init__(self, mixture: WeightedMixture, batch_size: int, seed: int = 0):
        self.components, self.batch_size, self.seed, self.epoch = mixture.components, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.components)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches, remainders = [], []
        for component in range(int(self.components.max()) + 1):
            indices = (self.components == component).nonzero().flatten()
            indices = indices[torch.randperm(len(indices), generator=generator)]
            whole = len(indices) // self.batch_size * self.batch_size
            batches += indices[:whole].split(self.batch_size)
            remainders.append(indices[whole:])
        mixed = torch.cat(remainders).split(self.batch_size)
        partial = [mixed[-1]] if mixed and len(mixed[-1]) < self.batch_size else []
        batches += mixed[: len(mixed) - len(partial)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return iter(torch.cat([batches[i] for i in order] + partial).tolist())


def _pool(size: int, num_samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """The indices of a component that may be drawn: all, or a seeded random subset of `num_samples`."""
    if num_samples is None or num_samples < 0 or num_samples >= size:
        return torch.arange(size)
    if num_samples == 0:
        raise ValueError("num_samples 0 leaves a component nothing to draw; remove it from the mixture instead")
    return torch.randperm(size, generator=generator)[:num_samples].sort().values


def _walk(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` items of `pool`, in shuffled passes, so every item is used before any repeats."""
    passes = max(1, -(-count // len(pool)))
    return torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(passes)])[:count]


def load_mixture(path: str | os.PathLike) -> WeightedMixture:
    """The mixture described by a YAML (`.yaml`/`.yml`) or JSON file (format in this module's docstring)."""
    path = Path(path)
    spec = _read_spec(path)
    if isinstance(spec, list):
        spec = {"datasets": spec}
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries:
        raise ValueError(f"{path}: expected a list of datasets, or a mapping with a 'datasets' list")
    datasets, weights, num_samples = [], [], []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: dataset entry {number} is a {type(entry).__name__}, not a mapping of its settings")
        dataset, weight, count = _load_entry(dict(entry), path.parent, f"{path}: dataset entry {number}")
        datasets.append(dataset)
        weights.append(weight)
        num_samples.append(count)
    for key in ("length", "seed"):
        if spec.get(key) is not None and not _is_int(spec[key]):
            raise ValueError(f"{path}: {key} must be an integer, got {spec[key]!r}")
    return WeightedMixture(datasets, weights, spec.get("length"), num_samples, spec.get("seed", 0))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_spec(path: Path) -> Any:
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ImportError(
                f"{path} is YAML, which needs pyyaml (pip install pyyaml); or write it as JSON"
            ) from error
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    return json.loads(path.read_text(encoding="utf-8"))


def _load_entry(
    entry: dict[str, Any], root: Path, name: str
) -> tuple[torch.utils.data.Dataset, float | None, int | None]:
    """A component dataset, its weight (None: unset) and its `num_samples` (None: unset); `name` says which entry
    of which file, for errors."""
    kind = entry.pop("type", None)
    if kind not in DATASET_TYPES:
        raise ValueError(f"{name}: dataset type {kind!r} is not one of {sorted(DATASET_TYPES)}")
    weight, num_samples = entry.pop("weight", None), entry.pop("num_samples", None)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
        raise ValueError(f"{name}: weight must be a positive number, got {weight!r}")
    if num_samples is not None and not _is_int(num_samples):
        raise ValueError(f"{name}: num_samples must be an integer (-1: all), got {num_samples!r}")
    for key, value in entry.items():
        if key.endswith("_path") and value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{name}: {key} must be a path, got {value!r}")
            entry[key] = root / value
    dataset_class = DATASET_TYPES[kind]
    try:  # bound first, so that a missing or unknown key is reported as such, not as the constructor's TypeError
        inspect.signature(dataset_class).bind(**entry)
    except TypeError as error:
        raise ValueError(f"{name} ({kind}): {error}; {kind} takes {_parameters(dataset_class)}") from None
    return dataset_class(**entry), weight, num_samples


def _parameters(dataset_class: type) -> str:
    """`a, b, [c]`: a dataset's settings, optional ones in brackets."""
    parameters = inspect.signature(dataset_class).parameters.values()
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"[{p.name}]" for p in parameters)
