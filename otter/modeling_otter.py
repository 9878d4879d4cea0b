"""Otter (Li et al., 2023): Flamingo instruction-tuned with in-context examples. Same architecture and
checkpoint layout as Flamingo; only the configuration (its `<answer>` token) differs."""

from flamingo.modeling_flamingo import FlamingoModel

from .configuration_otter import OtterConfig


class OtterModel(FlamingoModel):
    config: OtterConfig


__all__ = ["OtterModel"]
