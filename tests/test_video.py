"""Video input end to end: frame sampling, PyAV reading, the processor's `videos=` (shapes, mixed batches, refusals),
a model that uses its frames (logits change only where a changed clip is attended), save/load and generation."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_OTTER_DIR

from flamingo.loading import load_config, load_model, load_processor
from flamingo.video import clip_frames, read_video, sample_frame_indices, stretch_indices, write_video
from otter import OtterModel, OtterProcessor

HAS_AV = importlib.util.find_spec("av") is not None
needs_av = pytest.mark.skipif(not HAS_AV, reason='PyAV is not installed (pip install "flamingo-otter-hf[video]")')
TINY_VIDEO = "tiny-otter-video"


def frames(count: int, size: int = 32, offset: int = 0) -> list[Image.Image]:
    """Frames told apart by their red channel: frame i is (20 * (i + offset), 0, 0)."""
    return [Image.new("RGB", (size, size), (20 * (i + offset) % 256, 0, 0)) for i in range(count)]


def red(frame) -> int:
    return frame.getpixel((5, 5))[0] if isinstance(frame, Image.Image) else int(np.asarray(frame)[5, 5, 0])


@pytest.fixture(scope="module")
def video_processor() -> OtterProcessor:
    return load_processor(TINY_VIDEO)


@pytest.fixture(scope="module")
def image_processor() -> OtterProcessor:
    return load_processor("tiny-otter")


@pytest.fixture(scope="module")
def video_model() -> OtterModel:
    torch.manual_seed(0)
    model = OtterModel(load_config(TINY_VIDEO)).eval()
    with torch.no_grad():  # fresh gates are closed (0): open them so that the images reach the text
        for layer in model.decoder_layers:
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.attn_gate.fill_(0.8)
                layer.gated_cross_attn_layer.ff_gate.fill_(0.8)
    return model


# ---- frame sampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "num_frames"), [(10, 4), (100, 8), (9, 8), (17, 16), (5, 2), (1000, 128)])
def test_sampling_keeps_count_order_first_and_last(total, num_frames):
    indices = sample_frame_indices(total, num_frames)
    assert len(indices) == num_frames
    assert indices == sorted(set(indices))  # in order, no frame twice
    assert indices[0] == 0 and indices[-1] == total - 1
    gaps = np.diff(indices)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_short_clips_keep_every_frame_and_one_frame_is_the_middle():
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(9, 1) == [4]


@pytest.mark.parametrize(("total", "num_frames"), [(1, 4), (3, 6), (3, 8), (7, 8), (8, 8)])
def test_stretching_repeats_frames_evenly_in_order(total, num_frames):
    indices = stretch_indices(total, num_frames)
    assert len(indices) == num_frames and indices == sorted(indices)
    assert set(indices) == set(range(total))  # every frame kept, first and last included
    counts = np.bincount(indices)
    assert counts.max() - counts.min() <= 1


def test_clip_frames_of_lists_arrays_and_tensors_agree():
    clip = frames(10)
    array = np.stack([np.asarray(f) for f in clip])
    for given in (clip, array, torch.from_numpy(array)):
        assert [red(f) for f in clip_frames(given, 4, "clip")] == [0, 60, 120, 180]


@pytest.mark.parametrize(("clip", "error"), [([], "clip 0 of prompt 0 has no frames"),
                                             (np.zeros((2, 3)), "expected a list of frames")])
def test_bad_clips_are_named(video_processor, clip, error):
    with pytest.raises((ValueError, TypeError), match=error):
        video_processor("<image>x", videos=[[clip]])


# ---- video files ----------------------------------------------------------------------------------------------


@needs_av
def test_a_video_file_is_sampled_like_its_frames(tmp_path, video_processor):
    path = write_video(tmp_path / "clip.mp4", frames(12))
    read = read_video(path, 4)
    assert len(read) == 4 and read[0].size == (32, 32)
    assert [red(f) for f in read] == pytest.approx([0, 80, 140, 220], abs=6)  # frames 0, 4, 7, 11 (lossy codec)
    from_file = video_processor("<image>x", videos=str(path), num_frames=4)["vision_x"]
    from_frames = video_processor("<image>x", videos=read)["vision_x"]
    assert from_file.shape == (1, 1, 4, 3, 32, 32)
    torch.testing.assert_close(from_file, from_frames)


@needs_av
def test_unreadable_or_missing_video_files_are_named(tmp_path, video_processor):
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"clip 0 of prompt 0: .*junk.mp4 could not be read as a video"):
        video_processor("<image>x", videos=str(tmp_path / "junk.mp4"))
    with pytest.raises(FileNotFoundError, match="clip 0 of prompt 0: video file .*missing.mp4 does not exist"):
        video_processor("<image>x", videos=str(tmp_path / "missing.mp4"))


# ---- the processor --------------------------------------------------------------------------------------------


def test_images_only_batches_keep_one_frame(video_processor):
    vision_x = video_processor(["<image>a", "<image>b<image>c"], images=frames(3))["vision_x"]
    assert vision_x.shape == (2, 2, 1, 3, 32, 32)


def test_clips_default_to_the_models_frame_embeddings(video_processor):
    assert video_processor.max_num_frames == 8
    vision_x = video_processor("<image>a", videos=frames(20))["vision_x"]
    assert vision_x.shape == (1, 1, 8, 3, 32, 32)
    assert video_processor("<image>a", videos=frames(20), num_frames=3)["vision_x"].shape[2] == 3


def test_a_mixed_batch_stretches_images_and_short_clips(video_processor):
    clip, short, image = frames(6), frames(3, offset=6), Image.new("RGB", (32, 32), (0, 200, 0))
    out = video_processor(["<image>video", "<image>image", "<image>short<image>image too"],
                          videos=[[clip], [image], [short, image]])
    vision_x = out["vision_x"]
    assert vision_x.shape == (3, 2, 6, 3, 32, 32)
    one = lambda picture: video_processor("<image>", images=picture)["vision_x"][0, 0, 0]  # noqa: E731
    for k in range(6):
        torch.testing.assert_close(vision_x[0, 0, k], one(clip[k]))
        torch.testing.assert_close(vision_x[1, 0, k], one(image))  # an image: 1 frame, repeated
        torch.testing.assert_close(vision_x[2, 0, k], one(short[k // 2]))  # 3 frames, each twice, in order
        torch.testing.assert_close(vision_x[2, 1, k], one(image))
    assert not vision_x[1, 1].any()  # row 1 has one clip: its second slot is padding


def test_images_and_videos_given_separately_per_prompt(video_processor):
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    separate = video_processor(["<image>a", "<image>b"], images=[[image], []], videos=[[], [frames(4)]])["vision_x"]
    together = video_processor(["<image>a", "<image>b"], videos=[[image], [frames(4)]])["vision_x"]
    assert separate.shape == (2, 1, 4, 3, 32, 32)
    torch.testing.assert_close(separate, together)


def test_a_prompt_with_both_images_and_videos_is_refused(video_processor):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="Prompt 0 got both images and clips"):
        video_processor(["<image><image>a"], images=[[image]], videos=[[frames(3)]])
    with pytest.raises(ValueError, match="give each as one list per prompt"):
        video_processor("<image><image>a", images=image, videos=frames(3))


def test_clip_counts_are_checked_against_the_markers(video_processor):
    with pytest.raises(ValueError, match=r"Prompt 0 has 2 <image> marker\(s\) but 1 clip\(s\).*one clip's frames"):
        video_processor("<image>a<image>b", videos=frames(2))


def test_an_image_model_refuses_clips_and_says_why(image_processor):
    assert image_processor.images_only
    with pytest.raises(ValueError, match=r"clip 0 of prompt 1 has 4 frames, but this model takes images only.*"
                                         r"max_num_frames is None"):
        image_processor(["<image>a", "<image>b"], videos=[[frames(1)], [frames(4)]])
    assert image_processor("<image>a", videos=frames(4), num_frames=1)["vision_x"].shape == (1, 1, 1, 3, 32, 32)


def test_more_frames_than_frame_embeddings_are_refused(video_processor):
    with pytest.raises(ValueError, match="num_frames=9 is more than this model's 8 frame embeddings"):
        video_processor("<image>a", videos=frames(9), num_frames=9)


def test_an_unconfigured_processor_keeps_all_frames():
    processor = OtterProcessor.from_pretrained(TINY_OTTER_DIR)  # not through flamingo.loading: no model config
    assert processor("<image>a", videos=frames(12))["vision_x"].shape[2] == 12


# ---- the model ------------------------------------------------------------------------------------------------


def test_the_video_configs_have_frame_embeddings():
    assert load_config("otter-video-llama7b").max_num_frames == 128
    model = load_model(TINY_VIDEO)
    assert model.perceiver.frame_embs.shape == (8, model.config.vision_config.hidden_size)


def test_a_changed_frame_changes_only_the_tokens_attending_to_its_clip(video_processor, video_model):
    prompts = ["<image>User: first GPT:<answer> left<|endofchunk|><image>User: second GPT:<answer>",
               "<image>User: other GPT:<answer>"]
    clips = [[frames(5), frames(5, offset=5)], [frames(5, offset=2)]]
    inputs = video_processor(prompts, videos=clips)
    changed_clips = [[frames(5), [*frames(4, offset=5), Image.new("RGB", (32, 32), (0, 0, 255))]], clips[1]]
    changed = video_processor(prompts, videos=changed_clips)
    with torch.no_grad():
        before = video_model(**inputs).logits
        after = video_model(**changed).logits
    second_marker = (inputs["input_ids"][0] == video_processor.media_token_id).nonzero()[1].item()
    torch.testing.assert_close(after[0, :second_marker], before[0, :second_marker])  # before the changed clip
    assert (after[0, second_marker:] - before[0, second_marker:]).abs().amax(-1).min() > 1e-4  # every token after
    torch.testing.assert_close(after[1], before[1])  # the other row


def test_frame_order_matters_to_a_model_with_frame_embeddings(video_processor, video_model):
    clip = frames(5)
    forward = video_processor("<image>User: x GPT:<answer>", videos=clip)
    backward = video_processor("<image>User: x GPT:<answer>", videos=clip[::-1])
    with torch.no_grad():
        assert not torch.allclose(video_model(**forward).logits, video_model(**backward).logits)


def test_a_video_model_round_trips_through_save_and_load(tmp_path, video_processor, video_model):
    video_model.save_pretrained(tmp_path)
    video_processor.save_pretrained(tmp_path)
    loaded, processor = load_model(tmp_path), load_processor(tmp_path)
    assert loaded.config.max_num_frames == 8 and processor.max_num_frames == 8
    torch.testing.assert_close(loaded.perceiver.frame_embs, video_model.perceiver.frame_embs)
    inputs = processor(["<image>User: x GPT:<answer>"], videos=[[frames(6)]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, video_model(**inputs).logits)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_encodes_each_clip_once(video_processor, video_model, num_beams):
    inputs = video_processor(["<image>User: a GPT:<answer>", "<image>User: b GPT:<answer>"],
                             videos=[[frames(6)], [frames(3)]])
    calls, perceiver_calls = [], []
    hook = video_model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    perceiver_hook = video_model.perceiver.register_forward_hook(lambda *_: perceiver_calls.append(1))
    try:
        generated = video_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=num_beams,
                                         do_sample=False, pad_token_id=video_processor.pad_token_id)
    finally:
        hook.remove()
        perceiver_hook.remove()
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(calls) == 1 and len(perceiver_calls) == 1  # all frames of all clips in one pass, at the prefill


# ---- the memory planner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("trainable", "frames", "checkpointing"), [("all", 4, False), ("otter", 8, False),
                                                                  ("all", 4, True)])
def test_the_activation_model_counts_frames(trainable, frames, checkpointing):
    from flamingo.memory import activation_bytes, measure_saved_bytes

    torch.manual_seed(0)
    config = load_config(TINY_VIDEO)
    model = OtterModel(config)
    model.set_trainable(language_model=trainable == "all", vision_encoder=trainable == "all")
    measured = measure_saved_bytes(model, 2, 48, 1, checkpointing, frames=frames)
    predicted = activation_bytes(config, 2, 48, 1, torch.float32, trainable, checkpointing, frames).total
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_frames_grow_the_vision_side_only():
    from flamingo.memory import activation_bytes

    config = load_config("otter-video-llama7b")
    one, sixteen = (activation_bytes(config, 1, 512, 1, torch.bfloat16, "all", frames=f).parts for f in (1, 16))
    assert sixteen["vision_encoder"] == 16 * one["vision_encoder"]
    assert 5 * one["perceiver"] < sixteen["perceiver"] < 16 * one["perceiver"]  # the latents do not grow
    assert sixteen["cross_attention"] == one["cross_attention"] and sixteen["lm_decoder"] == one["lm_decoder"]


def test_flamingo_memory_frames(capsys):
    from flamingo.commands.memory import main

    assert main(["otter-video-llama7b", "--gpus", "1x80GB", "--frames", "16"]) in (0, 1)
    assert "frames 16" in capsys.readouterr().out
    assert main(["otter-9b-llama", "--frames", "16"]) == 2
    assert "takes images only" in capsys.readouterr().err
    assert main(["otter-video-llama7b", "--frames", "129"]) == 2
    assert "has 128 frame embeddings" in capsys.readouterr().err
