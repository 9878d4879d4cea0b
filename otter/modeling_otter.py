"""Otter (Li et al., 2023): Flamingo instruction-tuned with in-context examples. Same architecture and
checkpoint layout as Flamingo; only the configuration (its `<answer>` token) differs."""

from flamingo.modeling_flamingo import FlamingoModel, register_published_layout

from .configuration_otter import OtterConfig


class OtterModel(FlamingoModel):
    config: OtterConfig


register_published_layout(OtterConfig.model_type)

__all__ = ["OtterModel"]
