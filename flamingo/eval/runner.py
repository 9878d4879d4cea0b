"""Running a few-shot evaluation: prompts, batched generation or log-likelihood ranking, sharding, scores.

`evaluate(model, processor, task, shots=[0, 4, 8], trials=3)` runs every (shots, trial) pair of a task and returns
`Results`: per pair the score and one prediction per test item. The protocol is OpenFlamingo's:

- a prompt is the demonstrations' chunks, then the query's, in the format of the processor (`eval_prompt`); 0-shot
  uses `zero_shot_text_demos` (2) demonstrations without their images, as Flamingo did;
- captioning and VQA generate with beam search (3 beams, `length_penalty=0`) until `<|endofchunk|>`, then cut the
  answer as OpenFlamingo does; classification ranks the class names by their mean token log-likelihood after the
  prompt, without generating;
- trial `t` seeds its demonstrations with `seed + t`.

Speed: every image goes through the vision tower and perceiver once per run, not once per prompt or beam: its
latents are kept (`LatentCache`) and handed to the model as a `MediaCache`. Prompts are batched and left padded.
Classification runs the shared prompt once per item and scores the class names in batches on a copy of its KV cache.

Sharding: under `accelerate launch` (or torchrun) each process takes a contiguous share of the test items; the
predictions are gathered and scored once, on every process, so all return the same `Results`. An item's
demonstrations depend only on the seed and the item, so any number of processes gives the same predictions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flamingo.modeling_flamingo import MediaCache
from flamingo.processing_flamingo import ENDOFCHUNK_TOKEN, MEDIA_TOKEN

from . import metrics
from .demos import (
    DemoSelector,
    EpisodeDemos,
    OpenClipEncoder,
    RandomDemos,
    RicesDemos,
    UnreadableImageError,
    VisionTowerEncoder,
    open_media,
)
from .tasks import Example, Task

logger = logging.getLogger(__name__)

ID_KEYS = {"captioning": "image_id", "vqa": "question_id", "classification": "id"}


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    shots: int
    trial: int
    seed: int
    score: float
    predictions: list[dict[str, Any]]  # one per test item, in test order
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class Results:
    task: str
    model: str
    metric: str
    trials: list[TrialResult]
    config: dict[str, Any]

    def by_shots(self) -> dict[int, list[TrialResult]]:
        grouped: dict[int, list[TrialResult]] = {}
        for trial in self.trials:
            grouped.setdefault(trial.shots, []).append(trial)
        return grouped

    def to_json(self) -> dict[str, Any]:
        """The `results.json` layout: per shot count the mean, the (population) std and the trials' scores."""
        shots = {
            str(count): {
                "mean": statistics.fmean(t.score for t in trials),
                "std": statistics.pstdev([t.score for t in trials]),
                "trials": [t.score for t in trials],
                "seeds": [t.seed for t in trials],
                "skipped": dict(sum((t.skipped for t in trials), Counter())),
            }
            for count, trials in self.by_shots().items()
        }
        return {"task": self.task, "model": self.model, "metric": self.metric, "shots": shots, "config": self.config}


def markdown_table(results: Sequence[Results]) -> str:
    """OpenFlamingo's table layout: a row per task, a column per shot count, cells `mean ± std`."""
    shot_counts = sorted({count for result in results for count in result.by_shots()})
    lines = [
        "| Task | " + " | ".join(f"{count}-shot" for count in shot_counts) + " |",
        "|---|" + "---|" * len(shot_counts),
    ]
    for result in results:
        summary = result.to_json()["shots"]
        cells = [
            f"{summary[str(c)]['mean']:.1f} ± {summary[str(c)]['std']:.1f}" if str(c) in summary else "–"
            for c in shot_counts
        ]
        lines.append(f"| {result.task} ({result.metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Images: encoded once
# ---------------------------------------------------------------------------------------------------------------


class LatentCache:
    """Perceiver latents per image file (or clip folder), computed in batches on first use and kept (least recently
    used first out). Images are encoded in batches, clips one at a time through the processor (which samples their
    frames down to the model's frame embeddings).

    An image that cannot be decoded is remembered as such and raises `UnreadableImageError` every time it is asked
    for, so that its items are skipped the same way in every trial.
    """

    def __init__(self, model, processor, batch_size: int = 16, max_images: int = 4096):
        self.model, self.processor, self.batch_size, self.max_images = model, processor, batch_size, max_images
        self._latents: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._unreadable: dict[Path, str] = {}

    def prefetch(self, paths: Sequence[Path]) -> None:
        """Encode those of `paths` not seen yet, in batches."""
        self._fill(paths)

    def unreadable(self, paths: Sequence[Path]) -> Path | None:
        """The first of `paths` that cannot be decoded (after trying to), or None."""
        self._fill(paths)
        return next((path for path in paths if path in self._unreadable), None)

    def get(self, paths: Sequence[Path]) -> list[torch.Tensor]:
        """`(n_latents, D)` latents of each image, in order."""
        self._fill(paths)
        for path in paths:
            if path in self._unreadable:
                raise UnreadableImageError(self._unreadable[path])
            self._latents.move_to_end(path)
        return [self._latents[path] for path in paths]

    def _fill(self, paths: Sequence[Path]) -> None:
        todo = list(dict.fromkeys(p for p in paths if p not in self._latents and p not in self._unreadable))
        for start in range(0, len(todo), self.batch_size):
            images, names = [], []
            for path in todo[start : start + self.batch_size]:
                try:
                    images.append(open_media(path))
                    names.append(path)
                except UnreadableImageError as error:
                    logger.warning("%s: skipping the items that use it", error)
                    self._unreadable[path] = str(error)
            if images:
                self._encode(names, images)
        while len(self._latents) > self.max_images:
            self._latents.popitem(last=False)

    @torch.no_grad()
    def _encode(self, paths: list[Path], media: list) -> None:
        stills = [(path, image) for path, image in zip(paths, media, strict=True) if not isinstance(image, list)]
        if stills:
            pixels = self.processor.image_processor([image for _, image in stills], return_tensors="pt")["pixel_values"]
            vision_x = pixels[:, None, None].to(device=self.model.device, dtype=torch.float32)  # (N, T_img=1, F=1, C, H, W)
            for (path, _), latent in zip(stills, self.model.encode_images(vision_x).latents[:, 0], strict=True):
                self._latents[path] = latent
        for path, frames in zip(paths, media, strict=True):
            if isinstance(frames, list):
                vision_x = self.processor(text=MEDIA_TOKEN, videos=[frames])["vision_x"]  # (1, 1, F, C, H, W)
                self._latents[path] = self.model.encode_images(vision_x.to(self.model.device)).latents[0, 0]


def media_cache(rows: Sequence[Sequence[torch.Tensor]]) -> MediaCache:
    """A `MediaCache` for a batch from each row's image latents; rows with fewer images are zero-padded (no
    `<image>` token points at the padding)."""
    width = max(len(row) for row in rows)
    template = next(latent for row in rows for latent in row)
    latents = template.new_zeros(len(rows), width, *template.shape)
    for i, row in enumerate(rows):
        for j, latent in enumerate(row):
            latents[i, j] = latent
    return MediaCache(latents)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    index: int  # position of the item in the task's test list
    item: Example
    demos: list[Example]
    text: str
    images: list[Path]


def build_prompt(processor, task: Task, index: int, item: Example, demos: list[Example], with_images: bool) -> Prompt:
    """The demonstrations' chunks and the open query chunk; without images (0-shot) the demos lose their markers."""
    template = task.prompt
    chunks = []
    for demo in demos:
        chunk = processor.eval_prompt(task.prompt_style, answer=demo.answer, template=template, **demo.fields)
        chunks.append(chunk if with_images else chunk.replace(MEDIA_TOKEN, ""))
    if task.separator is not None:
        chunks = [
            chunk.removesuffix(processor.eval_demo_separators.get(task.prompt_style, "")) + task.separator
            for chunk in chunks
        ]
    query = processor.eval_prompt(task.prompt_style, template=template, **item.fields)
    images = [demo.image for demo in demos] if with_images else []
    images += [item.image] * query.count(MEDIA_TOKEN)
    return Prompt(index, item, demos, "".join(chunks) + query, images)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------


def evaluate(
    model,
    processor,
    task: Task,
    *,
    shots: Sequence[int] = (0, 4, 8),
    trials: int = 3,
    seed: int = 42,
    demos: str | DemoSelector = "random",
    batch_size: int = 8,
    num_beams: int = 3,
    max_new_tokens: int | None = None,
    length_penalty: float = 0.0,
    zero_shot_text_demos: int = 2,
    rices_encoder: str | None = None,
    rices_cache_dir: str | Path | None = None,
    limit: int | None = None,
    state=None,
    progress: bool = True,
    model_name: str | None = None,
) -> Results:
    """Evaluate `model` on `task` at each shot count, `trials` times with demonstrations seeded `seed + trial`.

    Args:
        model: a `FlamingoModel` (or subclass, e.g. `OtterModel`), in eval mode.
        processor: its processor; its `eval_prompt` gives the prompt format.
        task: from `flamingo.eval.tasks.load_task`.
        demos: "random", "rices", "episode" (each item's own, for a task of episodes), or a `DemoSelector`.
        rices_encoder: for "rices": an open_clip "NAME:PRETRAINED" instead of the model's own vision tower.
        rices_cache_dir: where RICES keeps the pool's embeddings (default: `rices_cache/` in the task's data folder).
        limit: evaluate only the first `limit` test items.
        state: an `accelerate.PartialState` to shard over (default: the current one); `OneProcess()` to evaluate on
            this process alone while the others wait (a probe during distributed training).
    Returns:
        `Results`, the same on every process.
    """
    from accelerate import PartialState

    state = state or PartialState()
    task = task.limit(limit)
    selector = _selector(
        model, processor, task, demos, rices_encoder, rices_cache_dir, batch_size, progress and state.is_main_process
    )
    runner = _Runner(
        model,
        processor,
        task,
        batch_size,
        num_beams,
        max_new_tokens or task.max_new_tokens,
        length_penalty,
        state,
        progress,
    )
    results = []
    for count in shots:
        for trial in range(trials):
            trial_seed = seed + trial
            demo_count = count if count > 0 else zero_shot_text_demos
            predictions = runner.run(
                selector,
                demo_count,
                with_images=count > 0,
                seed=trial_seed,
                description=f"{task.name} {count}-shot trial {trial} (seed {trial_seed})",
            )
            score, skipped = _score_once(task, predictions, state)
            results.append(TrialResult(count, trial, trial_seed, score, predictions, skipped))
            # A quiet evaluation (a probe inside training) says its scores at DEBUG: its caller reports them.
            logger.log(
                logging.INFO if progress else logging.DEBUG,
                "%s %d-shot trial %d (seed %d): %s %.2f", task.name, count, trial, trial_seed, task.metric, score,
            )
    config = {
        "shots": list(shots),
        "trials": trials,
        "seed": seed,
        "demos": demos if isinstance(demos, str) else type(demos).__name__,
        "batch_size": batch_size,
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens or task.max_new_tokens,
        "length_penalty": length_penalty,
        "zero_shot_text_demos": zero_shot_text_demos,
        "rices_encoder": rices_encoder,
        "limit": limit,
        "num_test_items": len(task.test),
        "num_demo_pool": len(task.train),
        "processes": state.num_processes,
        "left_out_at_load": dict(task.skipped),
        "data": task.source,
        "prompt_style": task.prompt_style,
        "prompt_template": task.prompt,
    }
    name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
    return Results(task.name, name, task.metric, results, config)


class OneProcess:
    """The `state` of an evaluation that runs on the calling process alone, whatever process group it is in."""

    num_processes, process_index, is_main_process = 1, 0, True

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items


def _selector(model, processor, task, demos, rices_encoder, cache_dir, batch_size, progress) -> DemoSelector:
    if not isinstance(demos, str):
        return demos
    if demos == "random":
        return RandomDemos(task.train)
    if demos == "episode":
        if task.episode_demos is None:
            raise ValueError(f"--demos episode needs a task made of episodes (format 'episodes'); {task.name} is not")
        return EpisodeDemos(task.episode_demos)
    if demos == "rices":
        encoder = (
            OpenClipEncoder(rices_encoder, model.device) if rices_encoder else VisionTowerEncoder(model, processor)
        )
        if cache_dir is None and task.source.get("data_dir"):
            cache_dir = Path(task.source["data_dir"]) / "rices_cache"
        return RicesDemos(task.train, encoder, cache_dir, batch_size=batch_size, progress=progress)
    raise ValueError(f"demos must be 'random', 'rices' or 'episode', not {demos!r}")


class _Runner:
    def __init__(self, model, processor, task, batch_size, num_beams, max_new_tokens, length_penalty, state, progress):
        self.model, self.processor, self.task, self.state = model, processor, task, state
        self.batch_size, self.num_beams, self.max_new_tokens, self.length_penalty = (
            batch_size,
            num_beams,
            max_new_tokens,
            length_penalty,
        )
        self.progress = progress and state.is_main_process
        self.latents = LatentCache(model, processor, batch_size=max(batch_size, 16))

    def run(
        self, selector: DemoSelector, demo_count: int, with_images: bool, seed: int, description: str
    ) -> list[dict]:
        """Predictions for every test item, gathered from all processes, in test order."""
        from accelerate.utils import gather_object

        indices = list(range(len(self.task.test)))
        with self.state.split_between_processes(indices) as mine:
            local = []
            for start in tqdm(
                range(0, len(mine), self.batch_size), desc=description, disable=not self.progress, unit="batch"
            ):
                batch = [(i, self.task.test[i]) for i in mine[start : start + self.batch_size]]
                chosen = selector.select(batch, demo_count, seed)
                prompts = [
                    build_prompt(
                        self.processor, self.task, i, item, [self.task.train[d] for d in demo_ids], with_images
                    )
                    for (i, item), demo_ids in zip(batch, chosen, strict=True)
                ]
                local += self._predict(prompts)
        gathered = gather_object(local) if self.state.num_processes > 1 else local
        return sorted(gathered, key=lambda record: record["index"])

    def _predict(self, prompts: list[Prompt]) -> list[dict]:
        usable, records = [], []
        self.latents.prefetch([path for prompt in prompts for path in prompt.images])  # the batch's new images at once
        for prompt in prompts:
            bad = self.latents.unreadable(prompt.images)
            if bad is None:
                usable.append(prompt)
            else:
                reason = "unreadable_image" if bad == prompt.item.image else "unreadable_demo_image"
                records.append(self._record(prompt, None, skipped=reason))
        if usable:
            if self.task.kind == "classification":
                records += [self._record(p, *self._rank(p)) for p in usable]
            else:
                records += [self._record(p, answer) for p, answer in zip(usable, self._generate(usable), strict=True)]
        return records

    def _record(
        self, prompt: Prompt, prediction, scores: list[float] | None = None, skipped: str | None = None
    ) -> dict:
        record = {
            "index": prompt.index,
            ID_KEYS[self.task.kind]: prompt.item.id,
            "prediction": prediction,
            "demos": [demo.id for demo in prompt.demos],
        }
        if scores is not None:
            record["class_scores"] = scores
        if skipped:
            record["skipped"] = skipped
        return record

    # ---- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, prompts: list[Prompt]) -> list[str]:
        # The tokenizer alone: the images are already encoded (the processor would want their pixels).
        inputs = self.processor.tokenizer([p.text for p in prompts], padding=True, return_tensors="pt").to(
            self.model.device
        )
        kwargs = {}
        if any(p.images for p in prompts):
            # one row per prompt: generate copies it per beam
            kwargs["media_cache"] = media_cache([self.latents.get(p.images) for p in prompts])
        generated = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty if self.num_beams > 1 else 1.0,
            do_sample=False,
            eos_token_id=self.processor.endofchunk_token_id,
            pad_token_id=self.processor.pad_token_id,
            **kwargs,
        )
        answers = self.processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])
        cut = metrics.postprocess_caption if self.task.kind == "captioning" else metrics.postprocess_vqa_answer
        return [cut(answer) for answer in answers]

    # ---- classification ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _rank(self, prompt: Prompt) -> tuple[str, list[float]]:
        """The class whose name continues the prompt with the highest mean token log-probability, and the mean
        log-probability of every class. The prompt runs once; the classes are scored in batches on copies of its
        KV cache."""
        device = self.model.device
        prefix = self.processor.tokenizer(prompt.text, return_tensors="pt")["input_ids"].to(device)
        media = media_cache([self.latents.get(prompt.images)]) if prompt.images else None
        out = self.model(input_ids=prefix, media_cache=media, use_cache=True)
        first = out.logits[0, -1].float().log_softmax(-1)
        continuations = [self._continuation_ids(prompt, name) for name in self.task.class_names]
        scores = []
        for start in range(0, len(continuations), self.batch_size):
            chunk = continuations[start : start + self.batch_size]
            scores += self._score_continuations(prefix, out.cache, media, first, chunk)
        best = max(range(len(scores)), key=scores.__getitem__)
        return self.task.class_names[best], scores

    def _continuation_ids(self, prompt: Prompt, class_name: str) -> list[int]:
        """The ids that a class name adds to the prompt (the text of the query chunk answered with it, past the
        query's own text)."""
        style, template = self.task.prompt_style, self.task.prompt
        query = self.processor.eval_prompt(style, template=template, **prompt.item.fields)
        answered = self.processor.eval_prompt(style, answer=class_name, template=template, **prompt.item.fields)
        answered = answered[: answered.rindex(ENDOFCHUNK_TOKEN)]
        if not answered.startswith(query):
            raise ValueError(f"the query prompt {query!r} is not a prefix of its answered form {answered!r}")
        return continuation_ids(self.processor.tokenizer, prompt.text, answered[len(query) :])

    def _score_continuations(self, prefix, cache, media, first_logprobs, chunk: list[list[int]]) -> list[float]:
        device = prefix.device
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), self.processor.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), prefix.shape[1] + length, dtype=torch.long, device=device)
        mask[:, : prefix.shape[1]] = 1
        for row, continuation in enumerate(chunk):
            ids[row, : len(continuation)] = torch.tensor(continuation, device=device)
            mask[row, prefix.shape[1] : prefix.shape[1] + len(continuation)] = 1
        if length > 1:
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_repeat_interleave(len(chunk))
            attended = self.model.attended_images(torch.cat([prefix.expand(len(chunk), -1), ids], dim=1))[:, -length:]
            rows_media = MediaCache(media.latents.expand(len(chunk), *media.latents.shape[1:])) if media else None
            logits = (
                self.model(
                    input_ids=ids[:, :-1],
                    attention_mask=mask[:, :-1],
                    cache=rows_cache,
                    media_cache=rows_media,
                    attended_image=attended[:, :-1],
                )
                .logits.float()
                .log_softmax(-1)
            )
        scores = []
        for row, continuation in enumerate(chunk):
            total = first_logprobs[continuation[0]].item()
            for position in range(1, len(continuation)):
                total += logits[row, position - 1, continuation[position]].item()
            scores.append(total / len(continuation))
        return scores


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """The ids that `continuation` adds after `context`: those of the joined text past the context's own, or, where
    tokenization merges across the boundary, the continuation tokenized alone (as OpenFlamingo does)."""
    full = tokenizer(context + continuation)["input_ids"]
    prefix = tokenizer(context)["input_ids"]
    if full[: len(prefix)] == prefix and len(full) > len(prefix):
        return full[len(prefix) :]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def _score_once(task: Task, predictions: list[dict], state) -> tuple[float, Counter[str]]:
    """Scored by the main process (CIDEr runs Java) and handed to the others."""
    if state.num_processes == 1:
        return score_predictions(task, predictions)
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [score_predictions(task, predictions)]
        except Exception as error:  # noqa: BLE001  handed to every process, so none waits forever
            outcome = [error]
    outcome = broadcast_object_list(outcome, from_process=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def score_predictions(task: Task, predictions: list[dict]) -> tuple[float, Counter[str]]:
    """The task's metric over the items that were not skipped, and the skipped items by reason."""
    skipped = Counter(record["skipped"] for record in predictions if record.get("skipped"))
    scored = [(record, task.test[record["index"]]) for record in predictions if not record.get("skipped")]
    if not scored:
        raise RuntimeError(f"every test item of {task.name} was skipped ({dict(skipped)}); nothing to score")
    if task.kind == "captioning":
        score = metrics.cider(
            {item.id: r["prediction"] for r, item in scored}, {item.id: item.references for _, item in scored}
        )
    elif task.metric == "exact match":
        score = metrics.exact_match({item.id: r["prediction"] for r, item in scored}, {item.id: item.answer for _, item in scored})
    elif task.kind == "vqa":
        score = metrics.vqa_accuracy(
            {item.id: r["prediction"] for r, item in scored}, {item.id: item.references for _, item in scored}
        )
    elif task.metric == "ROC AUC":
        positive = task.class_names.index("yes")
        score = metrics.roc_auc(
            [item.label for _, item in scored], [_softmax(r["class_scores"])[positive] for r, _ in scored]
        )
    else:
        score = metrics.top1_accuracy([r["prediction"] for r, _ in scored], [item.answer for _, item in scored])
    return score, skipped


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]
