"""`flamingo.kernels`: decoding-step products computed as `(W @ xᵀ)ᵀ` give `F.linear`'s results (to float32
rounding: 1e-6 relative on a product, 1e-5 on the logits of a decoding step) and apply only where they are meant to:
2 to 128 float32 rows on CPU, with more than one thread."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE, tiny_model

import flamingo.kernels as kernels
from flamingo.kernels import FewRowsLinear, decoding_linears, few_rows_linear


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def routed(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of the products FewRowsLinear computed its own way."""
    shapes = []

    def counting(x, weight, bias=None):
        shapes.append(tuple(x.shape))
        return few_rows_linear(x, weight, bias)

    monkeypatch.setattr(kernels, "few_rows_linear", counting)
    return shapes


@pytest.mark.parametrize("rows", [2, 4, 16, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_linear_is_linear(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=generator)
    weight = torch.randn(200, 96, generator=generator)
    bias = torch.randn(200, generator=generator) if with_bias else None
    output = few_rows_linear(x, weight, bias)
    assert output.shape == (rows, 1, 200) and output.is_contiguous()
    torch.testing.assert_close(output, F.linear(x, weight, bias), rtol=1e-6, atol=1e-5)


def test_mode_takes_few_float32_rows_on_cpu_only(routed):
    weight = torch.randn(64, 32)
    with FewRowsLinear():
        for shape in [(16, 1, 32), (2, 32), (1, 1, 32), (129, 32), (32,)]:
            F.linear(torch.randn(shape), weight)
        F.linear(torch.randn(8, 32, dtype=torch.float64), weight.double())
        torch.nn.Linear(32, 64)(torch.randn(4, 1, 32))
    assert routed == [(16, 1, 32), (2, 32), (4, 1, 32)]


def test_decoding_steps_enter_the_mode_from_two_rows_with_two_threads(two_threads):
    assert isinstance(decoding_linears(2), FewRowsLinear) and isinstance(decoding_linears(128), FewRowsLinear)
    assert not isinstance(decoding_linears(1), FewRowsLinear)  # the mode's own cost, for nothing
    assert not isinstance(decoding_linears(129), FewRowsLinear)
    torch.set_num_threads(1)
    assert not isinstance(decoding_linears(16), FewRowsLinear)


def test_decoding_step_under_the_mode_gives_the_plain_step_s_logits(two_threads, routed):
    """Four left-padded prompts with images, then one decoding step with and without the mode."""
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, 97, (4, 10), generator=generator)
    input_ids[:, 2] = IMAGE
    mask = torch.ones_like(input_ids)
    mask[1:, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vision_x = torch.randn(4, 1, 1, 3, 32, 32, generator=generator)
    with torch.inference_mode():
        prompt = model(input_ids=input_ids, vision_x=vision_x, attention_mask=mask, position_ids=positions,
                       use_cache=True)
        next_ids = prompt.logits[:, -1:].argmax(-1)
        step = dict(input_ids=next_ids, attention_mask=torch.cat([mask, mask[:, :1]], 1),
                    position_ids=positions[:, -1:] + 1, media_cache=prompt.media_cache, use_cache=True,
                    attended_image=model.attended_images(torch.cat([input_ids, next_ids], 1))[:, -1:])
        expected = model(**step, cache=copy.deepcopy(prompt.cache)).logits
        with decoding_linears(4):
            logits = model(**step, cache=copy.deepcopy(prompt.cache)).logits
    assert len(routed) > 5  # the attention, MLP and cross-attention projections and the head
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
