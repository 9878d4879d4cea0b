"""Otter: the in-context instruction-tuned Flamingo, as a Hugging Face transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from flamingo.modeling_flamingo import register_published_layout

from .configuration_otter import OtterConfig
from .processing_otter import OtterProcessor
from .modeling_otter import OtterModel

AutoConfig.register(OtterConfig.model_type, OtterConfig, exist_ok=True)
AutoModel.register(OtterConfig, OtterModel, exist_ok=True)
AutoModelForImageTextToText.register(OtterConfig, OtterModel, exist_ok=True)
AutoProcessor.register(OtterConfig, OtterProcessor, exist_ok=True)
register_published_layout(OtterConfig.model_type)

__all__ = ["OtterConfig", "OtterModel", "OtterProcessor"]
