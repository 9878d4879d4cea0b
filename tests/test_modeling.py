"""Behaviour of the core model on tiny configs: exactness against the bare LM, masking semantics,
caching, attention backends, errors."""

import pytest
import torch
from tiny_models import EOC, IMAGE, PAD, TINY_TEXT, batch, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from flamingo import FlamingoModel


def bare_language_model(model: FlamingoModel):
    """The stock LM with the same weights (every one of them: a strict load)."""
    lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    lm.load_state_dict(model.language_model_state_dict(), strict=True)
    return lm


@pytest.mark.parametrize("lm", sorted(TINY_TEXT))
def test_closed_gates_give_exactly_the_bare_lm(lm):
    model = tiny_model(lm, open_gates=False)
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        ours = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        bare = bare_language_model(model)(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(ours, bare)


@pytest.mark.parametrize("lm", sorted(TINY_TEXT))
def test_a_pretrained_language_model_loads_under_its_stock_names_and_leaves_the_cross_attention(lm):
    torch.manual_seed(1)
    stock = AutoModelForCausalLM.from_config(tiny_config(lm).text_config).eval()
    model = tiny_model(lm, open_gates=False)
    cross_attention = {k: v.clone() for k, v in model.state_dict().items() if "gated_cross_attn_layer" in k}
    model.load_language_model_state_dict(stock.state_dict())
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        ours = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        theirs = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(ours, theirs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in cross_attention.items())
    incomplete = dict(list(stock.state_dict().items())[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        model.load_language_model_state_dict({k: torch.zeros_like(v) for k, v in incomplete.items()})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a refused load changes nothing"


@pytest.mark.parametrize("lm", sorted(TINY_TEXT))
def test_splice_finds_decoder_layers_of_each_family(lm):
    model = tiny_model(lm)
    blocks = [i for i, layer in enumerate(model.decoder_layers) if layer.gated_cross_attn_layer is not None]
    assert blocks == [1, 3]  # before every 2nd decoder layer: (i + 1) % 2 == 0
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        with_images = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        other_images = model(input_ids=input_ids, vision_x=vision_x.flip(-1), attention_mask=attention_mask).logits
    assert not torch.allclose(with_images[0, -1], other_images[0, -1])  # images reach the LM in every family


def test_unfindable_decoder_layers_name_what_to_pass():
    config = tiny_config(decoder_layers_attr_name=None)
    config.text_config.num_hidden_layers = 4
    from flamingo.modeling_flamingo import find_decoder_layers

    lm = AutoModelForCausalLM.from_config(config.text_config)
    lm.model.extra = torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)])  # a second candidate
    with pytest.raises(ValueError, match=r"decoder_layers_attr_name='<dotted path>'.*model.layers"):
        find_decoder_layers(lm, None)
    assert find_decoder_layers(lm, "model.layers")[0] == "model.layers"


def test_changing_an_image_changes_only_logits_from_its_token_on(model):
    input_ids, attention_mask, vision_x = batch()
    changed = vision_x.clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])  # second image of row 0, token at position 6
    with torch.no_grad():
        before = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        after = model(input_ids=input_ids, vision_x=changed, attention_mask=attention_mask).logits
    assert torch.equal(before[0, :6], after[0, :6])
    assert (before[0, 6:] - after[0, 6:]).abs().amax(-1).min() > 1e-4
    assert torch.equal(before[1], after[1])  # the other row is untouched


def test_text_before_the_first_image_ignores_the_pixels(model):
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        after = model(input_ids=input_ids, vision_x=torch.randn_like(vision_x), attention_mask=attention_mask).logits
    assert torch.equal(before[1, :6], after[1, :6])  # row 1: <image> at position 6
    assert not torch.allclose(before[1, 6:], after[1, 6:])


def test_only_attend_previous_false_makes_text_see_the_next_image():
    model = tiny_model(only_attend_previous=False)
    input_ids = torch.tensor([[1, 5, IMAGE, 6, 7]])
    assert model.attended_images(input_ids).tolist() == [[1, 1, 1, 2, 2]]
    default = tiny_model()
    assert default.attended_images(input_ids).tolist() == [[0, 0, 1, 1, 1]]


def test_row_alone_equals_row_in_left_padded_batch(model):
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        batched = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        alone = model(input_ids=input_ids[1:, 3:], vision_x=vision_x[1:, :1]).logits
    torch.testing.assert_close(batched[1, 3:], alone[0], atol=1e-5, rtol=0)


def test_sdpa_and_eager_agree():
    input_ids, attention_mask, vision_x = batch()
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        assert model.vision_encoder.config._attn_implementation == "eager"
        assert model.lang_encoder.config._attn_implementation == "eager"
        eager = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (sdpa - eager)[real].abs().max() < 1e-5


def test_cached_greedy_generate_equals_loop_of_full_forwards(model):
    input_ids, attention_mask, vision_x = batch()
    generated = model.generate(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask,
                               max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    ids, mask = input_ids, attention_mask
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=ids, vision_x=vision_x, attention_mask=mask).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


def test_generate_encodes_images_once_and_projects_media_once_per_layer(model):
    input_ids, attention_mask, vision_x = batch()
    calls = {"vision": 0, "to_kv": 0}
    model.vision_encoder.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    for layer in model.decoder_layers:
        if layer.gated_cross_attn_layer is not None:
            layer.gated_cross_attn_layer.attn.to_kv.register_forward_hook(lambda *_: calls.__setitem__("to_kv", calls["to_kv"] + 1))
    model.generate(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask, max_new_tokens=6,
                   do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert calls == {"vision": 1, "to_kv": 2}


def test_new_tokens_attend_to_the_last_prompt_image(model):
    """Unlike Otter v0.1's cached decoding, generated tokens still see the image: changing it changes them."""
    input_ids = torch.tensor([[1, IMAGE, 10, 11]])
    vision_x = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=input_ids, vision_x=vision_x, use_cache=True)
        step = torch.tensor([[12]])
        cached = model(input_ids=step, media_cache=out.media_cache, cache=out.cache,
                       attended_image=model.attended_images(torch.cat([input_ids, step], 1))[:, -1:]).logits
        full = model(input_ids=torch.cat([input_ids, step], 1), vision_x=vision_x).logits[:, -1:]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_decoding_steps_match_full_forward_for_rows_on_different_images(model):
    """A one-token step gives each row just its current image's latents instead of a mask over all: the same logits
    as the masked full forward, for rows on their second image, on their first, and on none yet."""
    prompt = torch.tensor([[1, IMAGE, 10, IMAGE, 11], [1, IMAGE, 10, 11, 12], [1, 10, 11, 12, 13]])
    vision_x = torch.randn(3, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    step = torch.tensor([[14], [15], [16]])
    ids = torch.cat([prompt, step], dim=1)
    with torch.no_grad():
        out = model(input_ids=prompt, vision_x=vision_x, use_cache=True)
        cached = model(input_ids=step, media_cache=out.media_cache, cache=out.cache,
                       attended_image=model.attended_images(ids)[:, -1:]).logits
        full = model(input_ids=ids, vision_x=vision_x).logits[:, -1:]
        other_images = model(input_ids=ids, vision_x=vision_x.flip(1)).logits[:, -1:]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert (other_images[:2] - full[:2]).abs().max() > 1e-4  # the images matter to the rows that see one (10x atol)


def test_eos_defaults_to_endofchunk(model):
    assert model.generation_config.eos_token_id == EOC == model.config.endofchunk_token_id


def test_beam_search_keeps_each_row_with_its_own_images(model):
    input_ids, attention_mask, vision_x = batch()
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    together = model.generate(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask, **kwargs)
    alone = model.generate(input_ids=input_ids[1:, 3:], vision_x=vision_x[1:, :1], **kwargs)
    assert torch.equal(together[1, 3:], alone[0])


def test_beam_search_encodes_each_image_once(model):
    input_ids, attention_mask, vision_x = batch()
    pixels_encoded = []
    model.vision_encoder.register_forward_hook(lambda module, args, kwargs, out: pixels_encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    model.generate(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask, max_new_tokens=3, num_beams=3,
                   do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert pixels_encoded == [vision_x.shape[0] * vision_x.shape[1]]  # 2 rows x 2 images, not x 3 beams


def test_sampling_and_streaming():
    from threading import Thread

    from transformers import TextIteratorStreamer

    model = tiny_model()

    class Tokens:  # just enough of a tokenizer for the streamer
        def decode(self, ids, **_):
            return " ".join(str(int(i)) for i in ids)

    streamer = TextIteratorStreamer(Tokens(), skip_prompt=True)
    input_ids = torch.tensor([[1, IMAGE, 10]])
    kwargs = dict(input_ids=input_ids, vision_x=torch.randn(1, 1, 1, 3, 32, 32), max_new_tokens=6, do_sample=True,
                  top_p=0.9, temperature=0.8, eos_token_id=None, pad_token_id=PAD, streamer=streamer)
    torch.manual_seed(0)
    thread = Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer).split()
    thread.join()
    assert len(streamed) == 6 and all(0 <= int(t) < 100 for t in streamed)


def test_video_frames_use_frame_embeddings():
    model = tiny_model(max_num_frames=4)
    input_ids = torch.tensor([[1, IMAGE, 10, 11]])
    frames = torch.randn(1, 1, 3, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=input_ids, vision_x=frames).logits
        model.perceiver.frame_embs.add_(1.0)
        shifted = model(input_ids=input_ids, vision_x=frames).logits
    assert not torch.allclose(logits[0, 1:], shifted[0, 1:])
    with pytest.raises(ValueError, match="got 5 frames per image; this model has 4 frame embeddings"):
        model(input_ids=input_ids, vision_x=torch.randn(1, 1, 5, 3, 32, 32))


def test_text_only_forward_runs_the_feed_forward_branch(model):
    input_ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        bare = bare_language_model(model)(input_ids=input_ids).logits
    assert logits.shape == (1, 4, 100) and not torch.allclose(logits, bare)


def test_image_count_errors_name_the_row_and_counts(model):
    input_ids, attention_mask, vision_x = batch()
    with pytest.raises(ValueError, match=r"row 0 of input_ids has 2 <image> tokens \(id 98\) but vision_x holds 1 images per row"):
        model(input_ids=input_ids, vision_x=vision_x[:, :1], attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"vision_x holds 3 images per row but no row has more than 2 <image> tokens"):
        model(input_ids=input_ids, vision_x=torch.cat([vision_x, vision_x[:, :1]], 1), attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"vision_x holds 2 images per row but row 0 has 1 <image> tokens"):
        model(input_ids=torch.tensor([[1, IMAGE, 5]]), vision_x=vision_x[:1])
    with pytest.raises(ValueError, match=r"row 0 of input_ids has 1 <image> tokens \(id 98\) but vision_x holds 0"):
        model(input_ids=torch.tensor([[1, IMAGE, 5]]))
    with pytest.raises(ValueError, match=r"vision_x must be \(batch, images, frames, channels, height, width\); got shape \(1, 3, 32, 32\)"):
        model(input_ids=torch.tensor([[1, IMAGE, 5]]), vision_x=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="got 2 frames per image, but this model takes images only"):
        model(input_ids=torch.tensor([[1, IMAGE, 5]]), vision_x=torch.randn(1, 1, 2, 3, 32, 32))
