"""Scoring Otter's generated answers against references."""

import string

import torch

from flamingo.video import media_kwargs
from otter.data.samples import InstructionSample, blank_like
from otter.modeling_otter import OtterModel
from otter.processing_otter import OtterProcessor, build_prompt


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace and punctuation do not make an answer wrong."""
    return text.strip().lower().strip(string.punctuation + " ")


@torch.no_grad()
def generate_answers(model: OtterModel, processor: OtterProcessor, samples: list[InstructionSample], *,
                     blank_images: bool = False, batch_size: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to each sample's last chunk, with its earlier chunks as in-context examples. With
    `blank_images`, every image is replaced by a grey one: what the model can do without seeing."""
    answers = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        prompts = [build_prompt(s.chunks[-1][0], s.chunks[:-1]) for s in batch]
        images = [s.load_images() for s in batch]
        if blank_images:
            images = [[blank_like(media) for media in row] for row in images]
        inputs = processor(text=prompts, **media_kwargs(images)).to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=processor.pad_token_id)
        answers += processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])
    return answers


CONDITIONS = ("with_examples", "no_examples", "blank_images")


def task_scores(model: OtterModel, processor: OtterProcessor, samples: list[InstructionSample]) -> dict[str, float]:
    """Accuracy with the samples' in-context examples, without them, and with every image blank: what the model
    gets from the examples, and from the pictures."""
    alone = [sample.drop_examples(len(sample.examples)) for sample in samples]
    return {"with_examples": answer_accuracy(model, processor, samples),
            "no_examples": answer_accuracy(model, processor, alone),
            "blank_images": answer_accuracy(model, processor, samples, blank_images=True)}


def answer_accuracy(model: OtterModel, processor: OtterProcessor, samples: list[InstructionSample], **kwargs) -> float:
    """Fraction of samples whose generated answer equals the reference answer after `normalize_answer`."""
    answers = generate_answers(model, processor, samples, **kwargs)
    return sum(normalize_answer(a) == normalize_answer(s.chunks[-1][1]) for a, s in zip(answers, samples)) / len(samples)
