"""Bad input to the processor: images of every type and range, text that is not text, truncation, length limits."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_OTTER_DIR

from otter import OtterProcessor


@pytest.fixture(scope="module")
def processor():
    return OtterProcessor.from_pretrained(TINY_OTTER_DIR)


def photo(seed: int = 0, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A noisy HWC uint8 picture: every pixel value differs, so a wrong rescale or rounding shows."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def pixels(processor, picture) -> torch.Tensor:
    return processor(text="<image>a photo", images=picture)["vision_x"]


# ---- float images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_float", [
    lambda u8: u8.astype(np.float32) / 255,  # numpy HWC in [0, 1]
    lambda u8: u8.astype(np.float64) / 255,
    lambda u8: torch.from_numpy(u8).permute(2, 0, 1).float() / 255,  # torch CHW in [0, 1]
    lambda u8: torch.from_numpy(u8).float() / 255,  # torch HWC in [0, 1]
    lambda u8: u8.astype(np.float32),  # floats in 0-255
    lambda u8: Image.fromarray(u8),
    lambda u8: torch.from_numpy(u8).permute(2, 0, 1),  # uint8 CHW tensor
])
def test_float_images_in_0_1_give_the_uint8_pixels(processor, as_float):
    u8 = photo()
    assert torch.equal(pixels(processor, as_float(u8)), pixels(processor, u8))


def test_float_pixels_are_not_black(processor):
    """The old behaviour divided [0, 1] floats by 255 again: every image came out (nearly) black."""
    bright = np.ones((40, 48, 3), np.float32)
    assert pixels(processor, bright).mean() > 1.5  # CLIP-normalized white is about 1.9; black about -1.7


def test_half_precision_tensors_are_read(processor):
    u8 = photo()
    half = torch.from_numpy(u8).permute(2, 0, 1).to(torch.bfloat16) / 255
    torch.testing.assert_close(pixels(processor, half), pixels(processor, u8), atol=0.05, rtol=0)


@pytest.mark.parametrize("picture, error", [
    (np.full((8, 8, 3), -0.5, np.float32), r"image 0 of prompt 0 has values from -0.5 to -0.5; expected pixels, 0-255"),
    (np.full((8, 8, 3), 300.0, np.float32), r"has values from 300 to 300"),
    (np.full((8, 8, 3), 1000, np.int32), r"has values from 1000 to 1000"),
    (np.zeros((8, 8, 3), bool), "is a boolean array"),
    (np.full((8, 8, 3), np.nan, np.float32), "image 0 of prompt 0 holds NaN or infinite values"),
    (torch.full((3, 8, 8), float("inf")), "holds NaN or infinite values"),
    (np.zeros((8, 8, 4), np.uint8), r"has shape \(8, 8, 4\); expected 3 \(RGB\) or 1 channels"),
    (np.zeros((0, 8, 3), np.uint8), r"has shape \(0, 8, 3\): it is empty"),
    (np.zeros((8, 8), np.uint8), r"has shape \(8, 8\); expected a single image, HWC or CHW"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"has shape \(2, 8, 8, 3\); expected a single image"),
    ("cat.png", "image 0 of prompt 0 is a str; expected a PIL image, a numpy array or a torch tensor"),
    (b"\x89PNG", "is a bytes"),
])
def test_unusable_images_are_refused(processor, picture, error):
    with pytest.raises((TypeError, ValueError), match=error):
        pixels(processor, picture)


def test_the_bad_image_is_named_by_prompt_and_position(processor):
    good = photo()
    with pytest.raises(ValueError, match="image 1 of prompt 1 has shape"):
        processor(text=["<image>a", "<image><image>b"], images=[[good], [good, np.zeros((8, 8, 5), np.uint8)]])


# ---- text -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, error", [
    (None, "needs `text`"),
    ([], "`text` is an empty list"),
    ([None], "Prompt 0 is a NoneType, not a string"),
    (["a", 3], "Prompt 1 is a int, not a string"),
    (3, "`text` must be a string or a list of strings, not a int"),
    ({"text": "a"}, "not a dict"),
])
def test_text_that_is_not_text(processor, text, error):
    with pytest.raises((TypeError, ValueError), match=error):
        processor(text=text)


@pytest.mark.parametrize("text, images, error", [
    ("<image><image>two", [photo()], r"Prompt 0 has 2 <image> marker\(s\) but 1 image\(s\)"),
    ("no marker", [photo()], r"Prompt 0 has 0 <image> marker\(s\) but 1 image\(s\)"),
    ("<image>one", None, r"Prompt 0 has 1 <image> marker\(s\) but 0 image\(s\)"),
    (["<image>a", "<image>b"], [photo()], "The prompts have 2 <image> markers in all .* but 1 images"),
    (["<image>a", "<image>b"], [[photo()]], "Got 1 lists of images for 2 prompts"),
    (["<image>a"], [[photo()], photo()], "not a mix of both"),
])
def test_images_must_match_markers(processor, text, images, error):
    with pytest.raises(ValueError, match=error):
        processor(text=text, images=images)


# ---- truncation and length ---------------------------------------------------------------------------
def test_truncation_may_not_cut_image_markers(processor):
    prompt = "<image>" + "word " * 30 + "<image>last"
    with pytest.raises(ValueError, match="Truncating prompt 0 to 10 tokens would cut 1 of its 2 <image> markers"):
        processor(text=prompt, images=[photo(), photo(1)], truncation=True, max_length=10)
    left = copy.deepcopy(processor)
    left.tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="would cut 1 of its 2 <image> markers"):
        left(text=prompt, images=[photo(), photo(1)], truncation=True, max_length=10)


def test_truncation_that_keeps_every_marker_keeps_every_image(processor):
    inputs = processor(text="<image>first <image>second " + "word " * 30, images=[photo(), photo(1)],
                       truncation=True, max_length=8)
    assert inputs["input_ids"].shape[1] == 8 and (inputs["input_ids"] == processor.media_token_id).sum() == 2
    assert inputs["vision_x"].shape[1] == 2


def test_prompt_longer_than_a_stated_model_max_length_is_refused(processor):
    limited = copy.deepcopy(processor)
    limited.tokenizer.model_max_length = 8
    with pytest.raises(ValueError, match="Prompt 0 is \\d+ tokens, more than the tokenizer's model_max_length of 8"):
        limited(text="<image>" + "word " * 20, images=photo())
    assert limited(text="<image>short", images=photo())["input_ids"].shape[1] <= 8


def test_return_tensors_none_is_checked_too(processor):
    with pytest.raises(ValueError, match="would cut"):
        processor(text="word " * 20 + "<image>", images=photo(), truncation=True, max_length=5, return_tensors=None)


# ---- decoding and loading ----------------------------------------------------------------------------------
def test_decode_answers_refuses_a_prompt_length_outside_the_rows(processor):
    ids = torch.tensor([[5, 6, 7, 8]])
    for prompt_length in (-2, 5):
        with pytest.raises(ValueError, match=f"prompt_length must be between 0 and the rows' 4 ids, got {prompt_length}"):
            processor.decode_answers(ids, prompt_length=prompt_length)
    assert processor.decode_answers(ids, prompt_length=4) == [""]


def test_a_missing_base_tokenizer_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*no-tokenizer does not exist"):
        OtterProcessor.from_base_tokenizer(str(tmp_path / "no-tokenizer"))


def test_an_image_processor_without_rescaling_gets_the_images_as_given(processor):
    """Whoever turns rescaling off rescales the images themselves: float pixels in [0, 1] pass unchanged."""
    unscaled = copy.deepcopy(processor)
    unscaled.image_processor.do_rescale = False
    u8 = photo()
    difference = pixels(unscaled, u8.astype(np.float32) / 255) - pixels(processor, u8)
    assert difference.abs().mean() < 0.01  # not identical: transformers resizes float images through another path
