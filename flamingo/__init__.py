"""Flamingo-style vision-language models (OpenFlamingo) as Hugging Face transformers models."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_flamingo import FlamingoConfig
from .processing_flamingo import FlamingoProcessor
from .modeling_flamingo import FlamingoModel, FlamingoPreTrainedModel, MediaCache, register_published_layout

AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoModel.register(FlamingoConfig, FlamingoModel, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoModel, exist_ok=True)
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)
register_published_layout(FlamingoConfig.model_type)

__all__ = ["FlamingoConfig", "FlamingoModel", "FlamingoProcessor", "FlamingoPreTrainedModel", "MediaCache"]
