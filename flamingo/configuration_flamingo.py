"""Configuration of Flamingo models: a CLIP vision tower, a Perceiver resampler and gated
cross-attention layers spliced into a pretrained causal language model."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)


@strict
class FlamingoConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: a `CLIPVisionConfig` (or its dict). Image features are the encoder's last hidden
            state without the CLS token and without `post_layernorm`, as OpenFlamingo and Otter were trained.
        text_config: the config of any causal language model (resolved through `AutoConfig` by `model_type`).
        cross_attn_every_n_layers: a gated cross-attention block runs before every decoder layer `i` with
            `(i + 1) % n == 0` (OpenFlamingo: 1 for 3B, 2 for 4B, 4 for 9B).
        decoder_layers_attr_name: dotted path of the language model's `nn.ModuleList` of decoder layers
            (e.g. `"model.layers"`). `None` finds it from the model's structure.
        perceiver_depth / perceiver_heads / perceiver_dim_head / perceiver_num_latents / perceiver_ff_mult:
            the Perceiver resampler that turns each image into `perceiver_num_latents` visual tokens.
        max_num_frames: number of learned frame embeddings for video input (`None`: images only).
        cross_attn_heads / cross_attn_dim_head / cross_attn_ff_mult: the gated cross-attention blocks.
        only_attend_previous: each text token attends to the latest image at or before it (True, the
            published models) or, if False, text tokens attend to the next image.
        use_media_placement_augmentation: with `only_attend_previous=False`, choose previous or next image at
            random at each training forward (OpenFlamingo v1's augmentation). Never applies at inference.
        media_token_id / endofchunk_token_id: ids of `<image>` and `<|endofchunk|>`. When a config does not
            store them (the published ones do not), they are derived from the order in which the tokens were
            appended to the base vocabulary (`special_tokens`, then `<PAD>`).
    """

    model_type = "flamingo"
    # Appended to the base tokenizer in this order, then "<PAD>" (OpenFlamingo's factory order).
    special_tokens = ("<|endofchunk|>", "<image>")
    # Which config field holds the id of which added token.
    token_id_fields = {"media_token_id": "<image>", "endofchunk_token_id": "<|endofchunk|>"}

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cross_attn_every_n_layers: int = 4
    decoder_layers_attr_name: str | None = None
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    max_num_frames: int | None = None
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    cross_attn_ff_mult: int = 4
    only_attend_previous: bool = True
    use_media_placement_augmentation: bool = False
    media_token_id: int | None = None
    endofchunk_token_id: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_cross_attn_every_n_layers()
        missing = [field for field in self.token_id_fields if getattr(self, field) is None]
        if missing:
            ids = self.added_token_ids()
            for field in missing:
                setattr(self, field, ids[self.token_id_fields[field]])
            logger.info(f"Special token ids not in the config; derived from the vocabulary layout: {ids}")

    def _check_cross_attn_every_n_layers(self) -> None:
        every = self.cross_attn_every_n_layers
        if every < 1:
            raise ValueError(f"cross_attn_every_n_layers must be >= 1, got {every}")
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        if num_layers is not None and every > num_layers:
            # (i + 1) % every == 0 would hold for no layer: a model without any cross-attention, blind to images.
            raise ValueError(
                f"cross_attn_every_n_layers={every} is more than the language model's {num_layers} decoder layers, "
                f"so no layer would get cross-attention; use 1..{num_layers}"
            )

    @property
    def context_length(self) -> int | None:
        """The most tokens the language model takes, where its config states it (LLaMA, OPT, GPT-NeoX, Qwen2:
        `max_position_embeddings`; MPT: `max_seq_len`)."""
        text_config = self.text_config
        return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "max_seq_len", None)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        # Fail before building anything: a wrong config would otherwise fall back to 7B-sized defaults.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a `{found}` checkpoint, not a `{cls.model_type}` one. Load it "
                f"with the class for `{found}`, or with transformers.AutoModel, which picks the class from model_type."
            )
        return config_dict, kwargs

    def added_token_ids(self) -> dict[str, int]:
        """Ids of the tokens appended to the base vocabulary, as if appended at its end in the published
        order: `special_tokens`, then `<PAD>`. True for every published LLaMA checkpoint (vocab 32003/32004)
        and OpenFlamingo's MPT-7B (50280); a checkpoint whose embeddings were padded further (Otter-MPT's
        50432 rows) must store the ids in its config."""
        tokens = (*self.special_tokens, "<PAD>")
        first = self.text_config.vocab_size - len(tokens)
        return {token: first + i for i, token in enumerate(tokens)}


__all__ = ["FlamingoConfig"]
