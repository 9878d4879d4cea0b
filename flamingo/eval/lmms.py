"""lmms-eval (0.7.x) models `flamingo` and `otter`: `lmms-eval eval --model otter --model_args pretrained=<folder>`.

Registered through lmms-eval's documented plugin mechanism, the entry point group `lmms_eval.models` (see
pyproject.toml), whose payload is `manifests()`. Install with `pip install "flamingo-otter-hf[eval]"`.

Both classes implement lmms-eval's simple-model API: `generate_until` (batched, left padded, stop at
`<|endofchunk|>` and at the request's `until` strings) and `loglikelihood`: per request the continuation's negative
log-likelihood (summed over its tokens) and whether greedy decoding would produce it. A loss rather than a
log-probability, as lmms-eval's own models return (`llava_hf`: the LM loss) and as its `multiple_choice` scoring
expects (it takes the argmin over the choices). A request's images (its task's `doc_to_visual`) are interleaved in the
order of the context's `<image>` markers; images without a marker are put before the context, as Flamingo prompts
start with their image. A context without markers is wrapped in the processor's VQA prompt (OpenFlamingo's
`Question:... Short answer:`, Otter's `User: ... GPT:<answer>`).

model_args: `pretrained` (folder, shipped name or hub id), `tokenizer`, `dtype` (float32), `device_map`,
`batch_size` (1), `max_new_tokens` (default 32), `num_beams` (1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

from flamingo.processing_flamingo import MEDIA_TOKEN

from .runner import continuation_ids

logger = logging.getLogger(__name__)


def manifests() -> list[ModelManifest]:
    """The entry point's payload: lmms-eval model ids `flamingo` and `otter`."""
    return [
        ModelManifest(model_id="flamingo", simple_class_path="flamingo.eval.lmms.FlamingoLmms"),
        ModelManifest(model_id="otter", simple_class_path="flamingo.eval.lmms.OtterLmms"),
    ]


class FlamingoLmms(lmms):
    """A FlamingoModel (or any Flamingo-style model type: the folder's config decides) behind lmms-eval's API."""

    is_simple = True
    expected_model_type: str | None = None

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 32,
        num_beams: int | str = 1,
        **unused,
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        from flamingo.loading import load_model_and_processor

        if unused:
            logger.warning("flamingo lmms model: ignoring model_args %s", sorted(unused))
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device_map is None and state.device.type != "cpu":
            device_map = str(state.device)
        loaded = load_model_and_processor(pretrained, tokenizer=tokenizer, device_map=device_map, dtype=dtype)
        model_type = loaded.model.config.model_type
        if self.expected_model_type and model_type != self.expected_model_type:
            logger.warning("--model %s given a %r checkpoint (%s)", self.expected_model_type, model_type, pretrained)
        self.model, self.processor = loaded.model, loaded.processor
        self.batch_size = int(batch_size)
        self.max_new_tokens, self.num_beams = int(max_new_tokens), int(num_beams)

    # ---- prompts -------------------------------------------------------------------------------------------
    def _visuals(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [visual for visual in (visuals or []) if visual is not None]

    def prompt(self, context: str, num_images: int) -> str:
        """`context` with one `<image>` marker per image: the missing ones first; the processor's VQA prompt when
        the context has none of its own."""
        markers = context.count(MEDIA_TOKEN)
        if markers > num_images:
            raise ValueError(f"the context has {markers} {MEDIA_TOKEN} markers but the request has {num_images} images")
        if markers == 0 and num_images > 0:
            return MEDIA_TOKEN * (num_images - 1) + self.processor.eval_prompt("vqa", question=context.strip())
        return MEDIA_TOKEN * (num_images - markers) + context

    def _inputs(self, prompts: list[str], images: list[list]) -> dict:
        if any(images):
            return self.processor(text=prompts, images=images).to(self.model.device)
        return self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.model.device)

    # ---- lmms-eval API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one batch never mixes generation settings
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), desc="flamingo: generating", disable=self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                for index, answer in zip(batch, self._generate([requests[i] for i in batch]), strict=True):
                    answers[index] = answer
                progress.update(len(batch))
        progress.close()
        return answers

    def _generate(self, requests: Sequence[Instance]) -> list[str]:
        settings = dict(requests[0].args[1] or {})
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        images = [self._visuals(request) for request in requests]
        prompts = [self.prompt(request.args[0], len(row)) for request, row in zip(requests, images, strict=True)]
        inputs = self._inputs(prompts, images)
        do_sample = bool(settings.get("do_sample", False)) and float(settings.get("temperature", 0) or 0) > 0
        kwargs = (
            {"temperature": float(settings["temperature"]), "top_p": float(settings.get("top_p") or 1.0)}
            if do_sample
            else {}
        )
        generated = self.model.generate(
            **inputs,
            max_new_tokens=int(settings.get("max_new_tokens", self.max_new_tokens)),
            num_beams=int(settings.get("num_beams", self.num_beams) or 1),
            do_sample=do_sample,
            eos_token_id=self.processor.endofchunk_token_id,
            pad_token_id=self.processor.pad_token_id,
            **kwargs,
        )
        answers = self.processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])
        return [_cut(answer, until) for answer in answers]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each `(negative log-likelihood, is greedy)` pair comes wrapped in a `GenerationResult`: lmms-eval 0.7.3's
        evaluator (`unwrap_generation_output`) turns any other output that is not a string into its `str`, which
        its multiple_choice scoring then cannot unpack; a `GenerationResult`'s `text` passes through unchanged."""
        results = []
        for request in tqdm(requests, desc="flamingo: log-likelihoods", disable=self.rank != 0):
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self._visuals(request)
            prompt = self.prompt(context, len(images))
            ids = continuation_ids(self.processor.tokenizer, prompt, continuation)
            inputs = self._inputs([prompt], [images])
            full = torch.cat([inputs["input_ids"], torch.tensor([ids], device=self.model.device)], dim=1)
            logits = self.model(input_ids=full, vision_x=inputs.get("vision_x")).logits[0, -len(ids) - 1 : -1].float()
            target_ids = torch.tensor(ids, device=logits.device)
            loss = -logits.log_softmax(-1).gather(1, target_ids[:, None]).sum().item()
            results.append(GenerationResult(text=(loss, bool((logits.argmax(-1) == target_ids).all()))))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("flamingo/otter lmms-eval models answer single-round requests only")


class OtterLmms(FlamingoLmms):
    """The same for Otter checkpoints (its processor gives the chat prompt)."""

    expected_model_type = "otter"


def _cut(answer: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in answer:
            answer = answer.split(stop, 1)[0]
    return answer.strip()
