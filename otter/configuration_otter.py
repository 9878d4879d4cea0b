"""Otter's configuration: Flamingo's, plus the `<answer>` token that marks where a response begins."""

from huggingface_hub.dataclasses import strict

from flamingo.configuration_flamingo import FlamingoConfig


@strict
class OtterConfig(FlamingoConfig):
    """`FlamingoConfig` for Otter checkpoints (`model_type="otter"`). Otter appends `<answer>` after
    Flamingo's tokens, so with LLaMA: `<|endofchunk|>`=32000, `<image>`=32001, `<answer>`=32002, `<PAD>`=32003."""

    model_type = "otter"
    special_tokens = ("<|endofchunk|>", "<image>", "<answer>")
    token_id_fields = {**FlamingoConfig.token_id_fields, "answer_token_id": "<answer>"}

    answer_token_id: int | None = None


__all__ = ["OtterConfig"]
