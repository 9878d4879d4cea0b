"""Choosing the demonstrations (in-context examples) of each test item.

- `RandomDemos`: uniformly from the demonstration pool, seeded per trial *and per test item*, so an item gets the same
  demonstrations whichever process or batch it lands in (sharded runs equal single-process ones), and never itself.
- `RicesDemos`: Retrieval-based In-Context Example Selection (Yang et al., 2022; OpenFlamingo's `--rices`): the pool
  items whose image embeddings are most cosine-similar to the query's, the most similar last. The pool's embeddings
  are computed once, in batches, and cached on disk keyed by the encoder and the pool.
- `EpisodeDemos`: each test item's own demonstrations, for tasks made of episodes (`Task.episode_demos`), the last
  `count` of them (those nearest the query) at `count` shots.

Encoders: `VisionTowerEncoder` (the evaluated model's own CLIP vision tower, pooled) or `OpenClipEncoder` (an
open_clip model, e.g. `ViT-L-14:openai` as OpenFlamingo's evaluation used; weights from a local file or its cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from .tasks import IMAGE_SUFFIXES, Example

logger = logging.getLogger(__name__)


class UnreadableImageError(OSError):
    """An image file that exists but cannot be decoded."""


def open_image(path: Path) -> Image.Image:
    """The image at `path` as RGB; `UnreadableImageError` (naming the file) if PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error


def open_media(path: Path) -> Image.Image | list[Image.Image]:
    """An image file, or a folder of frame files: a clip, its frames in the order of their names."""
    if not path.is_dir():
        return open_image(path)
    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise UnreadableImageError(f"clip folder {path} has no frame images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [open_image(frame) for frame in frames]


def _item_key(example: Example) -> tuple[str, Path]:
    """What makes a pool item "the query itself": the same id and the same image."""
    return str(example.id), example.image


def _positions_by_item(pool: Sequence[Example]) -> dict[tuple[str, Path], list[int]]:
    positions: dict[tuple[str, Path], list[int]] = {}
    for position, example in enumerate(pool):
        positions.setdefault(_item_key(example), []).append(position)
    return positions


class DemoSelector(Protocol):
    def select(self, queries: Sequence[tuple[int, Example]], count: int, seed: int) -> list[list[int]]:
        """For each `(test index, item)`, the pool indices of its `count` demonstrations, in prompt order."""
        ...


class RandomDemos:
    """Uniformly random demonstrations from `pool`, never the query itself."""

    def __init__(self, pool: Sequence[Example]):
        self.pool = list(pool)
        self._positions = _positions_by_item(self.pool)

    def select(self, queries: Sequence[tuple[int, Example]], count: int, seed: int) -> list[list[int]]:
        return [self._select_one(index, query, count, seed) for index, query in queries]

    def _select_one(self, index: int, query: Example, count: int, seed: int) -> list[int]:
        excluded = self._positions.get(_item_key(query), [])
        available = len(self.pool) - len(excluded)
        if count > available:
            raise ValueError(f"{count} demonstrations asked for, but the pool has only {available} other items")
        # A string seed is hashed (SHA-512) by `random`, the same in every process and Python run.
        rng = random.Random(f"flamingo-eval:{seed}:{index}")
        drawn = rng.sample(range(len(self.pool)), count + len(excluded))
        return [position for position in drawn if position not in excluded][:count]


class EpisodeDemos:
    """Each test item's own demonstrations (an episode's), the same in every trial."""

    def __init__(self, episode_demos: Sequence[Sequence[int]]):
        self.episode_demos = episode_demos

    def select(self, queries: Sequence[tuple[int, Example]], count: int, seed: int) -> list[list[int]]:
        chosen = []
        for index, query in queries:
            own = list(self.episode_demos[index])
            if count > len(own):
                raise ValueError(f"{count} demonstrations asked for, but episode {query.id!r} has only {len(own)}")
            chosen.append(own[len(own) - count :])
        return chosen


class ImageEncoder(Protocol):
    key: str  # names the encoder's weights: the cache of pool embeddings is only reused for the same key

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) embeddings of `images`."""
        ...


class VisionTowerEncoder:
    """The evaluated model's own vision tower: CLIP's pooled output (the class token after `post_layernorm`)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        tower = model.vision_encoder
        first = next(tower.parameters()).detach().float().cpu()
        digest = hashlib.sha256(first.numpy().tobytes())
        digest.update(json.dumps(tower.config.to_dict(), sort_keys=True, default=str).encode())
        self.key = f"vision-tower:{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        tower = self.model.vision_encoder
        output = tower(pixel_values=pixels.to(device=tower.device, dtype=tower.dtype))
        return output.pooler_output.float().cpu()


class OpenClipEncoder:
    """An open_clip image encoder; `spec` is "NAME" or "NAME:PRETRAINED" (a tag such as `openai`, or a weights file)."""

    def __init__(self, spec: str, device: torch.device | str = "cpu"):
        import open_clip

        name, _, pretrained = spec.partition(":")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        self.model, self.preprocess, self.device = model.eval().to(device), preprocess, device
        self.key = f"open_clip:{spec}"

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()


class RicesDemos:
    """The pool items most similar to the query by image-embedding cosine similarity, the most similar last.

    Args:
        pool: the demonstration pool.
        encoder: computes the embeddings; its `key` and the pool's items key the on-disk cache.
        cache_dir: where the pool's embeddings are kept (`rices-<hash>.pt`); None: not cached on disk.
        batch_size: images per encoder call.
        progress: show a progress bar while embedding the pool.
    """

    def __init__(
        self,
        pool: Sequence[Example],
        encoder: ImageEncoder,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ):
        self.pool, self.encoder, self.batch_size = list(pool), encoder, batch_size
        self.cache_path = Path(cache_dir) / f"rices-{self._cache_key()}.pt" if cache_dir is not None else None
        self._positions = _positions_by_item(self.pool)
        self.features = self._pool_features(progress)
        self._unusable = self.features.norm(dim=1) == 0  # unreadable pool images
        self._query_features: dict[tuple[str, Path], torch.Tensor] = {}

    def _cache_key(self) -> str:
        digest = hashlib.sha256(self.encoder.key.encode())
        for example in self.pool:
            digest.update(f"\0{example.id}\0{example.image}".encode())
        return digest.hexdigest()[:20]

    def _pool_features(self, progress: bool) -> torch.Tensor:
        if self.cache_path is not None and self.cache_path.is_file():
            cached = torch.load(self.cache_path, weights_only=True)
            if cached["key"] == self.encoder.key and cached["features"].shape[0] == len(self.pool):
                logger.info("RICES: pool embeddings from %s", self.cache_path)
                return cached["features"]
        features = embed_images(
            [example.image for example in self.pool],
            self.encoder,
            self.batch_size,
            progress,
            "RICES: embedding the demonstration pool",
        )
        if self.cache_path is not None:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"key": self.encoder.key, "features": features}, self.cache_path)
                logger.info("RICES: pool embeddings cached in %s", self.cache_path)
            except OSError as error:  # a read-only data folder: still usable, only slower next time
                logger.warning("RICES: cannot write the embedding cache %s (%s)", self.cache_path, error)
        return features

    def select(self, queries: Sequence[tuple[int, Example]], count: int, seed: int) -> list[list[int]]:
        """`seed` is unused: retrieval is deterministic, so every trial gets the same demonstrations."""
        if count > len(self.pool) - 1:
            raise ValueError(f"{count} demonstrations asked for, but the pool has only {len(self.pool)} items")
        missing = [query for _, query in queries if _item_key(query) not in self._query_features]
        if missing:
            embedded = embed_images([query.image for query in missing], self.encoder, self.batch_size, False, "")
            for query, feature in zip(missing, embedded, strict=True):
                self._query_features[_item_key(query)] = feature
        similarity = torch.stack([self._query_features[_item_key(query)] for _, query in queries]) @ self.features.T
        similarity[:, self._unusable] = float("-inf")
        for row, (_, query) in enumerate(queries):
            similarity[row, self._positions.get(_item_key(query), [])] = float("-inf")
        top = similarity.topk(count, dim=1).indices
        return [list(reversed(row)) for row in top.tolist()]


def embed_images(
    paths: Sequence[Path],
    encoder: ImageEncoder,
    batch_size: int,
    progress: bool,
    description: str,
    opener: Callable[[Path], Image.Image] = open_image,
) -> torch.Tensor:
    """(N, D) L2-normalised embeddings; an unreadable image gets a zero row (never retrieved) and is logged."""
    rows: list[torch.Tensor | None] = []
    for start in tqdm(range(0, len(paths), batch_size), desc=description, disable=not progress, unit="batch"):
        images, slots = [], []
        for offset, path in enumerate(paths[start : start + batch_size]):
            try:
                images.append(opener(path))
                slots.append(offset)
            except UnreadableImageError as error:
                logger.warning("RICES: %s; it is never chosen as a demonstration", error)
        batch: list[torch.Tensor | None] = [None] * len(paths[start : start + batch_size])
        if images:
            features = torch.nn.functional.normalize(encoder.encode(images), dim=-1)
            for slot, feature in zip(slots, features, strict=True):
                batch[slot] = feature
        rows.extend(batch)
    width = next(row.shape[0] for row in rows if row is not None) if any(r is not None for r in rows) else 1
    return torch.stack([row if row is not None else torch.zeros(width) for row in rows])
