"""transformers' conventions the model and processor follow: `processor.image_token`, `processor(images, text)`,
`pixel_values` as an alias of `vision_x`."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import EOC, IMAGE, TINY_OTTER_DIR, tiny_model

from otter import OtterProcessor

PROMPTS = ["<image>User: What colour? GPT:<answer>", "<image>User: And this one? GPT:<answer>"]


@pytest.fixture(scope="module")
def processor():
    return OtterProcessor.from_pretrained(TINY_OTTER_DIR)


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(count)]


def test_image_token_is_the_media_marker(processor):
    assert processor.image_token == "<image>"
    assert processor.image_token_id == processor.media_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_images_and_text_in_either_order(processor):
    pictures = images(2)
    reference = processor(text=PROMPTS, images=pictures)
    for inputs in (processor(images=pictures, text=PROMPTS), processor(pictures, PROMPTS), processor(PROMPTS, pictures)):
        assert inputs.keys() == reference.keys()
        for key in reference:
            assert torch.equal(inputs[key], reference[key]), key
    single = processor(pictures[0], PROMPTS[0])
    assert torch.equal(single["vision_x"], processor(text=PROMPTS[0], images=pictures[0])["vision_x"])


def one_image_per_row():
    input_ids = torch.tensor([[1, IMAGE, 10, 11, 12], [1, 20, IMAGE, 21, 22]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return input_ids, pixels


def test_pixel_values_is_an_alias_of_vision_x_in_forward():
    model = tiny_model()
    input_ids, pixels = one_image_per_row()
    with torch.no_grad():
        expected = model(input_ids=input_ids, vision_x=pixels[:, None, None]).logits
        assert torch.equal(model(input_ids=input_ids, pixel_values=pixels).logits, expected)
        assert torch.equal(model(input_ids=input_ids, pixel_values=pixels[:, None, None]).logits, expected)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_pixel_values_is_an_alias_of_vision_x_in_generate(num_beams):
    model = tiny_model()
    input_ids, pixels = one_image_per_row()
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": num_beams, "eos_token_id": EOC}
    expected = model.generate(input_ids=input_ids, vision_x=pixels[:, None, None], **settings)
    assert torch.equal(model.generate(input_ids=input_ids, pixel_values=pixels, **settings), expected)


def test_pixel_values_of_another_rank_or_with_vision_x_is_refused():
    model = tiny_model()
    input_ids, pixels = one_image_per_row()
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, channels, height, width\).*got shape \(2, 1, 3, 32, 32\)"):
        model(input_ids=input_ids, pixel_values=pixels[:, None])
    with pytest.raises(ValueError, match="both vision_x and pixel_values"):
        model(input_ids=input_ids, pixel_values=pixels, vision_x=pixels[:, None, None])
    with pytest.raises(ValueError, match="both vision_x and pixel_values"):
        model.generate(input_ids=input_ids, pixel_values=pixels, vision_x=pixels[:, None, None], max_new_tokens=2)
