"""Processor for Otter: Flamingo's processor plus Otter's `<answer>` token, prompt format and answer extraction.

Otter is instruction-tuned on chunks `<image>User: {question} GPT:<answer> {answer}<|endofchunk|>`. In-context
examples are earlier chunks (one image each) and an inference prompt ends with `GPT:<answer>`, after which the
model writes the answer and closes the chunk with `<|endofchunk|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from string import Template

from flamingo.processing_flamingo import ENDOFCHUNK_TOKEN, MEDIA_TOKEN, FlamingoProcessor

from .configuration_otter import OtterConfig

ANSWER_TOKEN = "<answer>"
# Otter's prompt format, defined once: `build_prompt` writes it in Python and the chat template below is made from
# the same pieces. A chunk is `<image>` markers, USER + question, ASSISTANT + " " + answer, `<|endofchunk|>`.
USER = "User: "
ASSISTANT = f" GPT:{ANSWER_TOKEN}"


def chunk(question: str, answer: str | None = None, images: int = 1) -> str:
    """One chunk of Otter's format; without `answer`, the open chunk that asks the model for one."""
    opened = f"{MEDIA_TOKEN * images}{USER}{question}{ASSISTANT}"
    return opened if answer is None else f"{opened} {answer}{ENDOFCHUNK_TOKEN}"


def build_prompt(question: str, examples: Sequence[tuple[str, str]] = ()) -> str:
    """Otter's inference prompt: one chunk per in-context `(question, answer)` example, then the query chunk open at
    `GPT:<answer>`. Every chunk takes one image, so the prompt needs `len(examples) + 1` images, query's last."""
    return "".join(chunk(q, a) for q, a in examples) + chunk(question)


# Renders what `chunk` writes: a user turn is its images' markers (Otter puts the image first) and USER + text; an
# assistant turn completes the chunk; the generation prompt opens the answer.
OTTER_CHAT_TEMPLATE = Template("""\
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set items = [{'type': 'text', 'text': message['content']}] -%}
    {%- else -%}
        {%- set items = message['content'] -%}
    {%- endif -%}
    {%- set text = items | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
    {%- if message['role'] == 'user' -%}
        {{- '$media' * (items | selectattr('type', 'equalto', 'image') | list | length) + '$user' + text -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '$assistant ' + text + '$endofchunk' -}}
    {%- else -%}
        {{- raise_exception('Otter conversations have only user and assistant turns, got ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '$assistant' -}}
{%- endif -%}
""").substitute(media=MEDIA_TOKEN, user=USER, assistant=ASSISTANT, endofchunk=ENDOFCHUNK_TOKEN)


class OtterProcessor(FlamingoProcessor):
    """[`FlamingoProcessor`] with `<answer>` appended after Flamingo's special tokens, Otter's chat template, and
    `decode_answers` that returns the text after the last `<answer>` (so full sequences, prompt included, work)."""

    config_class = OtterConfig
    default_chat_template = OTTER_CHAT_TEMPLATE

    @property
    def answer_token_id(self) -> int:
        """Id of `<answer>`, which separates a question from its answer in every chunk."""
        return self._token_id(ANSWER_TOKEN)

    def _answer_ids(self, ids: list[int]) -> list[int]:
        """Otter's post-processing, `decoded.split("<answer>")[-1].split("<|endofchunk|>")[0]`, on ids."""
        answer = self.answer_token_id
        if answer in ids:
            ids = ids[len(ids) - ids[::-1].index(answer) :]
        return super()._answer_ids(ids)

    # Otter's chat chunks for flamingo.eval (see FlamingoProcessor.eval_prompt); chunks follow each other directly,
    # as in its instruction tuning.
    eval_prompt_templates = {
        "captioning": "<image>User: What does the image describe? GPT:<answer> {answer}",
        "vqa": "<image>User: {question} GPT:<answer> {answer}",
        "imagenet": "<image>User: What is in the image? GPT:<answer> {answer}",
        "hateful_memes": "<image>User: is an image with: '{ocr}' written on it. Is it hateful? GPT:<answer> {answer}",
    }
    eval_demo_separators: dict[str, str] = {}


__all__ = ["OTTER_CHAT_TEMPLATE", "OtterProcessor", "build_prompt", "chunk"]
