"""Video in the apps: a conversation with a clip, otter-serve's `video` content parts (frames as image URLs), the
client that sends them, and batching rows of different frame counts."""

import importlib.util

import pytest
import torch
from PIL import Image

for module in ("fastapi", "uvicorn"):  # otter.server's request parsing is part of what these tests check
    pytest.importorskip(module, reason="otter-serve's tests need the `serve` extra (pip install -e '.[serve]')")

from flamingo.loading import load_model_and_processor  # noqa: E402
from flamingo.video import write_video  # noqa: E402
from otter.client import openai_messages  # noqa: E402
from otter.conversation import ChatModel, Conversation, InputError, load_media  # noqa: E402
from otter.server import ImageSource, conversation_from_messages, left_pad, parse_request  # noqa: E402

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None,
                              reason='PyAV is not installed (pip install "flamingo-otter-hf[video]")')


def frames(count: int, offset: int = 0) -> tuple[Image.Image, ...]:
    return tuple(Image.new("RGB", (32, 32), (40 * (i + offset) % 256, 0, 0)) for i in range(count))


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    loaded = load_model_and_processor("tiny-otter-video")
    return ChatModel(loaded.model, loaded.processor, name="tiny-otter-video", trained=False)


def test_a_conversation_with_a_clip_and_an_image_gives_frames(chat):
    conversation = Conversation().ask("What happens?", [frames(5)]).answer("it moves").ask("And here?", [frames(1)[0]])
    inputs = chat.inputs(conversation)
    assert inputs["vision_x"].shape == (1, 2, 5, 3, 32, 32)
    assert (inputs["input_ids"] == chat.processor.media_token_id).sum() == 2  # one marker per clip or image
    assert torch.equal(inputs["vision_x"][0, 1, 0], inputs["vision_x"][0, 1, 4])  # the image, repeated


def test_an_empty_clip_is_refused():
    with pytest.raises(InputError, match="without frames"):
        Conversation().ask("What happens?", [()])


def test_video_parts_round_trip_through_the_client_and_the_server():
    conversation = Conversation().ask("What happens?", [frames(4)])
    messages = openai_messages(conversation)
    assert messages[0]["content"][0]["type"] == "video" and len(messages[0]["content"][0]["video"]["frames"]) == 4
    body = parse_request({"model": "m", "messages": messages})
    parsed = conversation_from_messages(body.messages, ImageSource(), max_images=8)
    clip = parsed.turns[0].images[0]
    assert isinstance(clip, tuple) and [f.tobytes() for f in clip] == [f.tobytes() for f in frames(4)]


def test_video_frames_count_against_max_images_and_bad_parts_are_named():
    messages = openai_messages(Conversation().ask("What happens?", [frames(6)]))
    body = parse_request({"model": "m", "messages": messages})
    with pytest.raises(InputError, match="6 images; this server accepts at most 4 .*a video's frames count one each"):
        conversation_from_messages(body.messages, ImageSource(), max_images=4)
    bad = parse_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]}]})
    with pytest.raises(InputError, match=r"messages\[0\].content\[0\] is a video part without 'video'"):
        conversation_from_messages(bad.messages, ImageSource(), max_images=8)


def test_batching_rows_stretches_clips_to_the_most_frames(chat):
    video = chat.inputs(Conversation().ask("What happens?", [frames(4)]))
    image = chat.inputs(Conversation().ask("What is it?", [frames(1, offset=3)[0]]))
    batch = left_pad([dict(video), dict(image)], chat.processor.pad_token_id)
    assert batch["vision_x"].shape == (2, 1, 4, 3, 32, 32)
    for k in range(4):
        torch.testing.assert_close(batch["vision_x"][1, 0, k], image["vision_x"][0, 0, 0])
    torch.testing.assert_close(batch["vision_x"][0], video["vision_x"][0])


@needs_av
def test_an_attached_video_file_becomes_a_clip(tmp_path, chat):
    path = write_video(tmp_path / "clip.mp4", list(frames(30)))
    clip = load_media(path)
    assert isinstance(clip, tuple) and len(clip) == 16  # VIDEO_FRAMES, sampled evenly
    inputs = chat.inputs(Conversation().ask("What happens?", [clip]))
    assert inputs["vision_x"].shape[2] == 8  # the processor keeps the model's 8 frame embeddings' worth
