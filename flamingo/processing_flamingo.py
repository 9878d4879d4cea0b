"""Processor for Flamingo models: turns prompts with `<image>` markers and their images into the model's inputs.

A prompt interleaves text and images, OpenFlamingo style: `"<image>An image of two cats.<|endofchunk|><image>An image
of"`. Each `<image>` marker is one token and stands for the next image (or video clip) of that prompt; the model's
cross-attention uses the markers' positions, while the pixels go in `vision_x` of shape `(batch, images, frames, 3,
H, W)`: one frame per image, a clip's frames along the third axis (`flamingo.video`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.image_utils import is_valid_image
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import logging

from .configuration_flamingo import FlamingoConfig
from .hub import export_code, processor_auto_map
from .local_files import check_local_model
from .video import clip_frames, is_clip, is_clip_or_image, stretch_indices

logger = logging.get_logger(__name__)

PAD_TOKEN = "<PAD>"
MEDIA_TOKEN = "<image>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"


class FlamingoProcessor(ProcessorMixin):
    r"""
    Holds a `CLIPImageProcessor` and the language model's tokenizer extended with the Flamingo special tokens.

    The published checkpoints ship no tokenizer files: their token ids only exist as the order in which the special
    tokens were appended to the base tokenizer (`config_class.special_tokens`, then `<PAD>` if the tokenizer has no
    pad token). Build the processor for such a checkpoint with [`FlamingoProcessor.from_base_tokenizer`]; a folder
    written by `save_pretrained` already holds the extended tokenizer and loads with `from_pretrained`.

    Args:
        image_processor (`CLIPImageProcessor`): turns images into pixel values.
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer that already contains `config_class.special_tokens`.
        chat_template (`str`, *optional*): a Jinja template for `apply_chat_template`; defaults to the class's
            `default_chat_template`.
    """

    config_class = FlamingoConfig
    default_chat_template: str | None = None
    # What the processor knows of its model's frame embeddings, set by `configure_for(config)` (`flamingo.loading`
    # does it): clips are sampled to `max_num_frames` frames and refused by an image model. Unset (a processor
    # built without its model's config), clips keep their frames and the model itself refuses too many.
    max_num_frames: int | None = None
    images_only: bool = False

    def __init__(
        self,
        image_processor: CLIPImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or self.default_chat_template)
        self._check_special_tokens()
        self._configure_tokenizer()

    @classmethod
    def from_base_tokenizer(
        cls,
        tokenizer_or_path: PreTrainedTokenizerBase | str | os.PathLike,
        image_processor: CLIPImageProcessor | None = None,
        **kwargs: Any,
    ) -> FlamingoProcessor:
        """Build the processor from the language model's own tokenizer, as the original code did at model init.

        Appends `config_class.special_tokens` as extra special tokens, then `<PAD>` as pad token if the tokenizer
        has none, in exactly that order: the checkpoints' embedding rows depend on it (LLaMA: `<|endofchunk|>`
        32000, `<image>` 32001, then Otter's `<answer>`, then `<PAD>`). A tokenizer object is copied, not modified.

        Args:
            tokenizer_or_path: a tokenizer, or a name/path for `AutoTokenizer.from_pretrained`.
            image_processor: defaults to `CLIPImageProcessor()` (224 px, CLIP mean/std), what Otter's inference used.
            kwargs: passed to `AutoTokenizer.from_pretrained` when `tokenizer_or_path` is a name or path.
        """
        if isinstance(tokenizer_or_path, PreTrainedTokenizerBase):
            tokenizer = copy.deepcopy(tokenizer_or_path)
        else:
            check_local_model(tokenizer_or_path, weights=False, what="tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_or_path, **kwargs)
        tokenizer.add_special_tokens(
            {"extra_special_tokens": list(cls.config_class.special_tokens)}, replace_extra_special_tokens=False
        )
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added = [*cls.config_class.special_tokens, tokenizer.pad_token]
        logger.info(f"Special token ids: {dict(zip(added, tokenizer.convert_tokens_to_ids(added), strict=True))}")
        return cls(image_processor=image_processor or CLIPImageProcessor(), tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlamingoProcessor:
        check_local_model(pretrained_model_name_or_path, weights=False)  # a missing folder, not "Repo id must be ..."
        # The tokenizer's loader reads config.json through AutoConfig: unless this model type is registered, the
        # folder's auto_map makes it ask whether to run the folder's code (an error without a terminal).
        AutoConfig.register(cls.config_class.model_type, cls.config_class, exist_ok=True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """`ProcessorMixin.save_pretrained`, plus `auto_map` in the processor and tokenizer configs and the processor's
        code (see `flamingo.hub`), so that transformers alone loads it with `trust_remote_code=True`."""
        self.auto_map = processor_auto_map(type(self))
        self.tokenizer.init_kwargs["auto_map"] = self.auto_map
        try:
            files = super().save_pretrained(save_directory, **kwargs)
        finally:
            del self.tokenizer.init_kwargs["auto_map"]
        export_code(save_directory, [type(self)])
        return files

    def configure_for(self, config: FlamingoConfig) -> FlamingoProcessor:
        """Take the model's frame limit from its config: `max_num_frames` frame embeddings, or none (images only)."""
        self.max_num_frames = getattr(config, "max_num_frames", None)
        self.images_only = self.max_num_frames is None
        return self

    def _check_special_tokens(self) -> None:
        """Fail early when given a base tokenizer: without the special tokens `<image>` would be split into pieces
        and silently never reach the model as a media marker."""
        for token in self.config_class.special_tokens:
            if self.tokenizer.encode(token, add_special_tokens=False) != [self._token_id(token)]:
                raise ValueError(
                    f"The tokenizer does not have the special token {token!r} as a single token. Build the "
                    f"processor with {type(self).__name__}.from_base_tokenizer(tokenizer), which adds "
                    f"{self.config_class.special_tokens}."
                )

    def _configure_tokenizer(self) -> None:
        # Generation appends to the right end of every row, so prompts of different lengths are padded on the left.
        # Set here rather than saved: tokenizers only save `padding_side` when it was an init argument.
        self.tokenizer.padding_side = "left"
        # transformers 5's LlamaTokenizer rebuilds its pre-tokenizer from `legacy` when loaded but does not save
        # `legacy`: without this, a saved processor would reload tokenizing differently after special tokens.
        if hasattr(self.tokenizer, "legacy"):
            self.tokenizer.init_kwargs["legacy"] = self.tokenizer.legacy

    def _token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def media_token_id(self) -> int:
        """Id of `<image>`, the marker of each image's position in the text."""
        return self._token_id(MEDIA_TOKEN)

    @property
    def image_token(self) -> str:
        """The image placeholder of prompts, under transformers' usual name: `<image>`."""
        return MEDIA_TOKEN

    @property
    def image_token_id(self) -> int:
        """Id of `image_token` (the same as `media_token_id`)."""
        return self.media_token_id

    @property
    def endofchunk_token_id(self) -> int:
        """Id of `<|endofchunk|>`, which ends each (image, text) chunk; generation stops on it."""
        return self._token_id(ENDOFCHUNK_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "vision_x"]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        return_tensors: str = "pt",
        num_frames: int | None = None,
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts (left padded) and stack their images and video clips into `vision_x`.

        `text` and `images` may also be given the other way round, `processor(images, text)`, transformers' order for
        multimodal processors: prompts are told from images by type.

        Args:
            text: a prompt or a list of prompts; each `<image>` marker stands for the next image or clip of its prompt.
            images: `None`; one image (for a single prompt); a list of images, which is split over the prompts in
                order of their markers (for a single prompt: its images); or a list with one list of images per
                prompt. An image is a PIL image, or a numpy array or torch tensor of shape HWC or CHW.
            videos: clips, laid out as `images` is: one clip (for a single prompt); a list of clips split over the
                prompts' markers; or one list of clips per prompt. A clip is a list of frames (images), an
                `(F, H, W, C)` array or tensor, or a video file's path (read with PyAV); in a list of clips, an
                image is a clip of one frame, which is how one prompt mixes images and clips. With both `images`
                and `videos`, give each as one list per prompt, and each prompt its media from one of them.
            return_tensors: tensor type of `input_ids` and `attention_mask`; `vision_x` is always a torch tensor.
            num_frames: clips with more frames are sampled down to this many, evenly, first and last kept (default:
                `max_num_frames`, the model's frame embeddings, when `configure_for` set it; else all frames).
            tokenizer_kwargs: passed to the tokenizer (default `padding=True`; the tokenizer pads on the left).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(B, T)`, and, if any prompt has images or clips,
            `vision_x` float32 `(B, T_img, F, 3, H, W)`, `T_img` the most media of any prompt (rows with fewer are
            zero-padded at the end) and `F` the most frames of any clip (1 for images only). Shorter clips and
            images are stretched to `F` frames by repeating their frames evenly (`flamingo.video.stretch_indices`).
        """
        if _is_text(images) and not _is_text(text):
            text, images = images, text
        prompts = _prompts(text, type(self).__name__)
        marker_counts = [prompt.count(MEDIA_TOKEN) for prompt in prompts]
        media_per_prompt = self._media_per_prompt(images, videos, marker_counts, self._num_frames(num_frames))

        tokenizer_kwargs = {"padding": True, **tokenizer_kwargs}
        data = dict(self.tokenizer(prompts, return_tensors=return_tensors, **tokenizer_kwargs))
        self._check_tokenized(data["input_ids"], marker_counts, tokenizer_kwargs)
        if any(media_per_prompt):
            data["vision_x"] = self._vision_x(media_per_prompt)
        return BatchFeature(data=data)

    def _num_frames(self, num_frames: int | None) -> int | None:
        """The most frames a clip keeps: `num_frames`, else the model's `max_num_frames` (None: no limit known)."""
        if num_frames is None:
            return self.max_num_frames
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if self.max_num_frames is not None and num_frames > self.max_num_frames:
            raise ValueError(
                f"num_frames={num_frames} is more than this model's {self.max_num_frames} frame embeddings "
                f"(config.max_num_frames); use at most {self.max_num_frames}"
            )
        return num_frames

    def _media_per_prompt(
        self, images: Any, videos: Any, marker_counts: list[int], num_frames: int | None
    ) -> list[list[list[Any]]]:
        """Per prompt, per `<image>` marker, the frames of its image (one) or clip (sampled to `num_frames`)."""
        if videos is None:
            return [[[image] for image in row] for row in self._images_per_prompt(images, marker_counts)]
        if images is None:
            clips_per_prompt = self._clips_per_prompt(videos, marker_counts)
        else:
            clips_per_prompt = self._mixed_per_prompt(images, videos, marker_counts)
        media = []
        for i, clips in enumerate(clips_per_prompt):
            row = [clip_frames(clip, num_frames, f"clip {j} of prompt {i}") for j, clip in enumerate(clips)]
            for j, frames in enumerate(row):
                self._check_frames(frames, f"clip {j} of prompt {i}")
            media.append(row)
        return media

    def _check_frames(self, frames: list[Any], name: str) -> None:
        if self.images_only and len(frames) > 1:
            raise ValueError(
                f"{name} has {len(frames)} frames, but this model takes images only: its config has no frame "
                "embeddings (max_num_frames is None). Pass one frame (num_frames=1, or the frame as an image), "
                "or use a video checkpoint (e.g. luodian/OTTER-Video-LLaMA7B-DenseCaption)."
            )
        for k, frame in enumerate(frames):
            _check_image(frame, f"frame {k} of {name}")

    def _clips_per_prompt(self, videos: Any, marker_counts: list[int]) -> list[list[Any]]:
        """Normalize `videos` to one list of clips per prompt, checking it against the prompts' markers."""
        if is_clip(videos):
            rows = self._split_by_markers([videos], marker_counts)
        elif isinstance(videos, (list, tuple)) and videos and all(is_clip_or_image(clip) for clip in videos):
            rows = self._split_by_markers(list(videos), marker_counts)
        elif isinstance(videos, (list, tuple)) and videos and all(isinstance(row, (list, tuple)) for row in videos):
            if len(videos) != len(marker_counts):
                raise ValueError(f"Got {len(videos)} lists of clips for {len(marker_counts)} prompts.")
            rows = [[row] if is_clip(row) else list(row) for row in videos]
        else:
            raise TypeError(
                "`videos` must be a clip (a list of frames, an (F, H, W, C) array or tensor, a video file's path), "
                f"a list of clips, or one list of clips per prompt; got {_describe(videos)}"
            )
        for i, (row, count) in enumerate(zip(rows, marker_counts, strict=True)):
            if len(row) != count:
                hint = " (a list of images is one clip's frames)" if count > 1 and len(row) == 1 else ""
                raise ValueError(
                    f"Prompt {i} has {count} {MEDIA_TOKEN} marker(s) but {len(row)} clip(s) were given for it{hint}."
                )
        return rows

    def _mixed_per_prompt(self, images: Any, videos: Any, marker_counts: list[int]) -> list[list[Any]]:
        """`images` and `videos` both given: one list per prompt each, every prompt's media from one of them (an
        image among the clips, a clip of one frame, is how one prompt has both, in an order that is clear)."""
        for name, given in (("images", images), ("videos", videos)):
            if not isinstance(given, (list, tuple)) or len(given) != len(marker_counts):
                raise ValueError(
                    f"With both images and videos, give each as one list per prompt ({len(marker_counts)} prompts); "
                    f"`{name}` is {_describe(given)}"
                )
        image_rows = [[] if row is None else list(row) if isinstance(row, (list, tuple)) else [row] for row in images]
        clip_rows = [[] if _is_empty(row) else [row] if is_clip(row) else list(row) for row in videos]
        for i, (image_row, clip_row) in enumerate(zip(image_rows, clip_rows, strict=True)):
            if image_row and clip_row:
                raise ValueError(
                    f"Prompt {i} got both images and clips, so which marker takes which is unclear; pass its images "
                    "in its list of clips instead (an image there is a 1-frame clip), in the order of its markers."
                )
        merged = [image_row or clip_row for image_row, clip_row in zip(image_rows, clip_rows, strict=True)]
        return self._clips_per_prompt(merged, marker_counts)

    def _check_tokenized(self, input_ids: Any, marker_counts: list[int], tokenizer_kwargs: dict) -> None:
        """Truncation must not cut `<image>` markers (their images would stay, attached to no token, and the model
        would refuse them or, worse, give later images to earlier text); and a prompt must fit the tokenizer's
        `model_max_length` when it states one."""
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
        media, limit = self.media_token_id, self.tokenizer.model_max_length
        for i, (row, expected) in enumerate(zip(rows, marker_counts, strict=True)):
            kept = row.count(media)
            if kept != expected:
                length = tokenizer_kwargs.get("max_length", limit)
                raise ValueError(
                    f"Truncating prompt {i} to {length} tokens would cut {expected - kept} of its {expected} "
                    f"{MEDIA_TOKEN} markers while keeping their images; shorten its text, raise max_length, or "
                    f"drop the images whose markers do not fit."
                )
            if not tokenizer_kwargs.get("truncation") and limit < VERY_LARGE_INTEGER and len(row) > limit:
                raise ValueError(
                    f"Prompt {i} is {len(row)} tokens, more than the tokenizer's model_max_length of {limit}; "
                    "shorten it (truncation=True cuts it, as long as no <image> marker is cut)."
                )

    def _images_per_prompt(self, images: Any, marker_counts: list[int]) -> list[list[Any]]:
        """Normalize `images` to one list per prompt, checking it against the prompts' `<image>` markers."""
        if images is None:
            rows = [[] for _ in marker_counts]
        elif not isinstance(images, (list, tuple)):
            rows = self._split_by_markers([images], marker_counts)
        elif images and all(isinstance(row, (list, tuple)) for row in images):
            if len(images) != len(marker_counts):
                raise ValueError(f"Got {len(images)} lists of images for {len(marker_counts)} prompts.")
            rows = [list(row) for row in images]
        elif any(isinstance(row, (list, tuple)) for row in images):
            raise ValueError("`images` must be a list of images or a list of lists of images, not a mix of both.")
        else:
            rows = self._split_by_markers(list(images), marker_counts)

        for i, (row, count) in enumerate(zip(rows, marker_counts, strict=True)):
            if len(row) != count:
                raise ValueError(
                    f"Prompt {i} has {count} {MEDIA_TOKEN} marker(s) but {len(row)} image(s) were given for it."
                )
            for j, image in enumerate(row):
                _check_image(image, f"image {j} of prompt {i}")
        return rows

    @staticmethod
    def _split_by_markers(images: list[Any], marker_counts: list[int]) -> list[list[Any]]:
        """A flat list of images for a batch: give each prompt as many images as it has markers, in order."""
        if len(marker_counts) == 1:
            return [images]
        if len(images) != sum(marker_counts):
            raise ValueError(
                f"The prompts have {sum(marker_counts)} {MEDIA_TOKEN} markers in all ({marker_counts} per prompt) "
                f"but {len(images)} images were given."
            )
        starts = [sum(marker_counts[:i]) for i in range(len(marker_counts))]
        return [images[start : start + count] for start, count in zip(starts, marker_counts, strict=True)]

    def _vision_x(self, media_per_prompt: list[list[list[Any]]]) -> torch.Tensor:
        """Per prompt, per marker, a list of frames -> `(B, T_img, F, 3, H, W)`; see `__call__` for the padding."""
        frames = [frame for row in media_per_prompt for clip in row for frame in clip]
        pixels = self._pixel_values(frames)
        num_frames = max(len(clip) for row in media_per_prompt for clip in row)
        num_images = max(map(len, media_per_prompt))
        vision_x = pixels.new_zeros(len(media_per_prompt), num_images, num_frames, *pixels.shape[1:])
        start = 0
        for i, row in enumerate(media_per_prompt):
            for j, clip in enumerate(row):
                stretched = [start + k for k in stretch_indices(len(clip), num_frames)]
                vision_x[i, j] = pixels[stretched]
                start += len(clip)
        return vision_x

    def _pixel_values(self, images: list[Any]) -> torch.Tensor:
        """(N, 3, H, W) pixel values of PIL images, arrays and tensors (checked by `_check_image`). An image processor
        set up with `do_rescale=False` gets the images as they are: its user rescales them."""
        if getattr(self.image_processor, "do_rescale", True):
            images = [_as_uint8(image) for image in images]
        return self.image_processor(images, return_tensors="pt")["pixel_values"].float()

    def decode_answers(
        self, generated_ids: torch.Tensor | Sequence[Sequence[int]], prompt_length: int | None = None
    ) -> list[str]:
        """Decode generated continuations into answers.

        Args:
            generated_ids: `(B, T)` ids (a tensor or nested lists), or a single `(T,)` sequence.
            prompt_length: if given, the first `prompt_length` ids of each row (the left-padded prompt) are dropped.

        Returns:
            One string per row: the text before the first `<|endofchunk|>` (where a chunk, hence the answer, ends),
            without special tokens and surrounding whitespace.
        """
        rows = generated_ids.tolist() if hasattr(generated_ids, "tolist") else list(generated_ids)
        rows = [rows] if rows and isinstance(rows[0], int) else [list(row) for row in rows]
        longest = max(map(len, rows), default=0)
        if prompt_length is not None and not 0 <= prompt_length <= longest:
            # A negative length would keep the *last* ids of each row: a wrong answer, not an error.
            raise ValueError(f"prompt_length must be between 0 and the rows' {longest} ids, got {prompt_length}")
        return [
            self.tokenizer.decode(self._answer_ids(row[prompt_length or 0 :]), skip_special_tokens=True).strip()
            for row in rows
        ]

    def _answer_ids(self, ids: list[int]) -> list[int]:
        """The part of a generated row that is the answer: everything before the first `<|endofchunk|>`."""
        eoc = self.endofchunk_token_id
        return ids[: ids.index(eoc)] if eoc in ids else ids

    # ---- few-shot evaluation prompts (flamingo.eval) ----------------------------------------------------------------
    # OpenFlamingo's evaluation formats (open_flamingo/eval/models/open_flamingo.py), by task prompt style; `{answer}`
    # is the caption, answer or class name, the other fields come from the task's items.
    eval_prompt_templates: dict[str, str] = {
        "captioning": "<image>Output:{answer}",
        "vqa": "<image>Question:{question} Short answer:{answer}",
        "imagenet": "<image>Output:{answer}",
        "hateful_memes": "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}",
    }
    # OpenFlamingo puts a newline after each captioning and VQA demonstration, nothing after classification ones.
    eval_demo_separators: dict[str, str] = {"captioning": "\n", "vqa": "\n"}

    def eval_prompt(self, style: str, *, answer: str | None = None, template: str | None = None, **fields: str) -> str:
        """One chunk of a few-shot evaluation prompt in this model's format.

        Args:
            style: a key of `eval_prompt_templates` (captioning, vqa, imagenet, hateful_memes).
            answer: a demonstration's answer: the chunk is closed with `<|endofchunk|>` (and the style's separator);
                `None` for the query, which ends where the model is to write.
            template: a template to use instead of the model's (a task file's `prompt`).
            fields: the template's other fields (`question`, `ocr`).
        """
        if template is None:
            if style not in self.eval_prompt_templates:
                raise KeyError(f"no evaluation prompt {style!r} for {type(self).__name__}; have {sorted(self.eval_prompt_templates)}")
            template = self.eval_prompt_templates[style]
        if answer is None:
            return template.format(answer="", **fields).rstrip()
        return template.format(answer=answer, **fields) + ENDOFCHUNK_TOKEN + self.eval_demo_separators.get(style, "")


def _prompts(text: Any, processor_name: str) -> list[str]:
    if text is None:
        raise ValueError(f"{processor_name} needs `text`: every image is placed by a {MEDIA_TOKEN} marker.")
    prompts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if prompts is None:
        raise TypeError(f"`text` must be a string or a list of strings, not a {type(text).__name__}.")
    if not prompts:
        raise ValueError("`text` is an empty list: give at least one prompt.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"Prompt {i} is a {type(prompt).__name__}, not a string.")
    return prompts


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and not value)


def _describe(value: Any) -> str:
    shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
    size = f" of {len(value)}" if isinstance(value, (list, tuple)) else ""
    return f"a {type(value).__name__}{shape}{size}"


def _is_text(value: Any) -> bool:
    """A prompt or a non-empty list of prompts."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


def _check_image(image: Any, name: str) -> None:
    """Reject what `CLIPImageProcessor` would fail on with an obscure message, or misread: a batch of images, a
    channel count it cannot normalize, pixel values outside 0-255 (or [0, 1] for floats)."""
    if not is_valid_image(image):
        raise TypeError(f"{name} is a {type(image).__name__}; expected a PIL image, a numpy array or a torch tensor.")
    if isinstance(image, PIL.Image.Image):
        return
    shape = tuple(image.shape)
    if len(shape) != 3:
        raise ValueError(f"{name} has shape {shape}; expected a single image, HWC or CHW.")
    if 0 in shape:
        raise ValueError(f"{name} has shape {shape}: it is empty.")
    if shape[-1] not in (1, 3) and shape[0] not in (1, 3):
        raise ValueError(f"{name} has shape {shape}; expected 3 (RGB) or 1 channels first or last (convert RGBA to RGB).")
    if _dtype_kind(image) == "b":
        raise TypeError(f"{name} is a boolean array (a mask?); expected pixel values, uint8 0-255 or float 0-1.")
    low, high = _value_range(image)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} holds NaN or infinite values.")
    if low < 0 or high > 255:
        raise ValueError(
            f"{name} has values from {low:g} to {high:g}; expected pixels, 0-255 (or 0-1 as floats), not values "
            "already normalized (pass the raw image: the processor normalizes it)."
        )


def _dtype_kind(image: Any) -> str:
    """numpy's dtype kind of an array or tensor: "u"/"i" integers, "f" floats, "b" booleans."""
    if isinstance(image, torch.Tensor):
        return "b" if image.dtype == torch.bool else "f" if image.is_floating_point() else "i"
    return np.asarray(image).dtype.kind


def _value_range(image: Any) -> tuple[float, float]:
    array = image.float() if isinstance(image, torch.Tensor) else np.asarray(image)
    return float(array.min()), float(array.max())


def _as_uint8(image: Any) -> Any:
    """An array or tensor as 0-255 uint8 pixels, in its own layout; PIL images as they are.

    The image processor would divide float pixels in [0, 1] by 255 again (a black image), and its resize goes
    through 8-bit PIL images anyway, truncating floats: rounding here makes a float image in [0, 1] give exactly the
    pixel values of the uint8 image it came from. Float images are read as [0, 1] when none of their values exceeds
    1 (so a float image in 0-255 that dark reads as [0, 1] too), else as 0-255."""
    if isinstance(image, PIL.Image.Image):
        return image
    if _dtype_kind(image) != "f":
        return image.to(torch.uint8) if isinstance(image, torch.Tensor) else np.asarray(image).astype(np.uint8)
    scale = 255.0 if _value_range(image)[1] <= 1 else 1.0
    if isinstance(image, torch.Tensor):
        return (image.float() * scale).round().to(torch.uint8)
    return np.round(np.asarray(image, dtype=np.float32) * scale).astype(np.uint8)


__all__ = ["FlamingoProcessor"]
