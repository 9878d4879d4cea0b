"""Video clips as lists of frames: uniform frame sampling, stretching to a batch's frame count, reading files.

A clip reaches the model as frames along `vision_x`'s third axis, `(B, T_img, F, 3, H, W)`, one `<image>` marker per
clip; the perceiver adds a learned embedding per frame (`config.max_num_frames` of them) and resamples all frames'
patches into one set of latents. A clip is given as

* a list or tuple of frames (PIL images, HWC/CHW arrays or tensors), in order;
* a `(F, H, W, C)` (or `(F, C, H, W)`) numpy array or torch tensor;
* the path of a video file, decoded with PyAV (`pip install "flamingo-otter-hf[video]"`).

Longer clips are sampled down to `num_frames` evenly, keeping the first and the last frame; one batch holds one frame
count, so shorter clips (and images, 1-frame clips) are stretched to the batch's longest by repeating frames evenly
(see `stretch_indices`): the perceiver has no mask over frames, and a repeated frame adds nothing the clip did not
show, where a blank one would add patches of a grey picture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import is_valid_image

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` of `total` frames, evenly spaced, in order, the first and the last frame included.

    A clip of at most `num_frames` frames keeps them all. One frame of a longer clip is its middle one (the first
    is often a fade-in)."""
    if total < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame to sample and to keep, got {total} frames and num_frames={num_frames}")
    if total <= num_frames:
        return list(range(total))
    if num_frames == 1:
        return [(total - 1) // 2]
    # Rounded positions on the line from 0 to total - 1: distinct because total > num_frames.
    return [round(i * (total - 1) / (num_frames - 1)) for i in range(num_frames)]


def stretch_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices into `total <= num_frames` frames, each frame repeated evenly, in order, first and last
    included: 1 frame to 4 is `[0, 0, 0, 0]`, 3 to 6 is `[0, 0, 1, 1, 2, 2]`."""
    if not 1 <= total <= num_frames:
        raise ValueError(f"can stretch 1..{num_frames} frames to {num_frames}, not {total}")
    return [i * total // num_frames for i in range(num_frames)]


def is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def is_clip(value: Any) -> bool:
    """A video file's path, a 4-D array/tensor of frames, or a non-empty list/tuple of images (its frames)."""
    if is_path(value):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 4
    return isinstance(value, (list, tuple)) and bool(value) and all(is_valid_image(frame) and _ndim(frame) == 3
                                                                    for frame in value)


def is_clip_or_image(value: Any) -> bool:
    """What one `<image>` marker may take in `videos=`: a clip, or a single image (a clip of one frame)."""
    return is_clip(value) or (is_valid_image(value) and _ndim(value) == 3)


def _ndim(image: Any) -> int:
    return 3 if isinstance(image, PIL.Image.Image) else len(getattr(image, "shape", ()))


def clip_frames(clip: Any, num_frames: int | None, name: str) -> list[Any]:
    """The frames of a clip (or of a single image: one frame), sampled down to `num_frames` (None: all of them).
    `name` says which clip, for errors (`"clip 0 of prompt 1"`)."""
    if is_path(clip):
        return read_video(clip, num_frames, name)
    if isinstance(clip, (np.ndarray, torch.Tensor)) and clip.ndim == 4:
        frames = list(clip.unbind(0)) if isinstance(clip, torch.Tensor) else list(clip)
    elif isinstance(clip, (list, tuple)):
        frames = list(clip)
    elif is_valid_image(clip) and _ndim(clip) == 3:
        frames = [clip]
    else:
        shape = f" of shape {tuple(clip.shape)}" if hasattr(clip, "shape") else ""
        raise TypeError(
            f"{name} is a {type(clip).__name__}{shape}; expected a list of frames (PIL images or HWC arrays), an "
            "(F, H, W, C) array or tensor, or a video file's path"
        )
    if not frames:
        raise ValueError(f"{name} has no frames")
    return [frames[i] for i in sample_frame_indices(len(frames), num_frames or len(frames))]


def read_video(path: PathLike, num_frames: int | None, name: str = "the video") -> list[PIL.Image.Image]:
    """`num_frames` frames of a video file (None: every frame), sampled evenly with the first and last kept, as RGB
    PIL images. Decodes the file once when its container states the frame count, twice otherwise."""
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: {path} has no video stream")
            stated = container.streams.video[0].frames
        total = stated or _count_frames(av, path)
        frames = _decode(av, path, set(sample_frame_indices(total, num_frames or total)))
    except av.FFmpegError as error:
        raise ValueError(f"{name}: {path} could not be read as a video ({error})") from error
    if not frames:
        raise ValueError(f"{name}: {path} has no decodable frames")
    if stated and len(frames) < len(sample_frame_indices(stated, num_frames or stated)):
        # The container's count was wrong (it happens with variable frame rates): sample what was decoded.
        logger.warning("%s: %s states %d frames but fewer decode; sampling from those", name, path, stated)
        every = _decode(av, path, None)
        frames = [every[i] for i in sample_frame_indices(len(every), num_frames or len(every))]
    return frames


def _decode(av: Any, path: Path, keep: set[int] | None) -> list[PIL.Image.Image]:
    """The frames at the indices in `keep` (None: all), in order; stops after the last one wanted."""
    last = max(keep) if keep else None
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if keep is None or index in keep:
                frames.append(frame.to_image().convert("RGB"))
            if last is not None and index >= last:
                break
    return frames


def _count_frames(av: Any, path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:
        raise ImportError(
            'reading video files needs PyAV: pip install "flamingo-otter-hf[video]" (or pip install av); '
            "or pass the clip as a list of frames"
        ) from error
    return av


def media_kwargs(rows: Sequence[Sequence[Any]]) -> dict[str, list]:
    """The processor keyword for decoded media, one list per prompt of images and clips (lists of frames):
    `images=` when all are images, else `videos=` with each image as a 1-frame clip (stretched to the batch's frames
    like any short clip)."""
    if not any(isinstance(media, (list, tuple)) for row in rows for media in row):
        return {"images": [list(row) for row in rows]}
    return {"videos": [[list(media) if isinstance(media, (list, tuple)) else [media] for media in row] for row in rows]}


def write_video(path: PathLike, frames: Sequence[PIL.Image.Image], fps: int = 4) -> Path:
    """Write frames as a lossless-enough MPEG-4 file with PyAV (for tests and examples; sizes rounded to even)."""
    av = _import_av()
    path = Path(path)
    width, height = (frames[0].width + 1) // 2 * 2, (frames[0].height + 1) // 2 * 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").resize((width, height)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


__all__ = ["clip_frames", "is_clip", "is_clip_or_image", "media_kwargs", "read_video", "sample_frame_indices", "stretch_indices",
           "write_video"]
