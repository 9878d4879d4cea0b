"""Bad input to the model API: FlamingoConfig, FlamingoModel.forward/generate, from_pretrained of local folders.

Every case asserts the specific error (which row, tensor, token, file and what was expected)."""

import pytest
import torch
from refusals import tree_hashes
from tiny_models import IMAGE, PAD, TINY_TOKENIZER_DIR, batch, tiny_config, tiny_model

from flamingo import FlamingoModel, FlamingoProcessor
from flamingo.local_files import check_local_model, looks_like_local_path
from flamingo.modeling_flamingo import splice_cross_attention

GREEDY = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def image(rows: int = 1, count: int = 1) -> torch.Tensor:
    return torch.randn(rows, count, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---- images against <image> tokens -------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["forward", "generate"])
@pytest.mark.parametrize("input_ids, vision_x, error", [
    ([[1, IMAGE, 5, IMAGE, 6]], image(1, 1), r"row 0 of input_ids has 2 <image> tokens \(id 98\) but vision_x holds 1 images per row"),
    ([[1, IMAGE, 5, IMAGE, 6]], None, r"row 0 of input_ids has 2 <image> tokens .* holds 0 images per row \(no images were given"),
    ([[1, 5, 6]], image(1, 1), r"vision_x holds 1 images per row but row 0 has 0 <image> tokens"),
    ([[1, IMAGE, 5], [1, IMAGE, 6]], image(2, 2), r"vision_x holds 2 images per row but no row has more than 1 <image> tokens"),
])
def test_images_must_match_image_tokens(model, entry, input_ids, vision_x, error):
    inputs = dict(input_ids=torch.tensor(input_ids), vision_x=vision_x)
    with pytest.raises(ValueError, match=error):
        model(**inputs) if entry == "forward" else model.generate(**inputs, **GREEDY)


def test_generate_accepts_positional_prompt_and_checks_it(model):
    with pytest.raises(ValueError, match="row 0 of input_ids has 1 <image> tokens"):
        model.generate(torch.tensor([[1, IMAGE, 5]]), **GREEDY)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_checks_the_prompt_once_not_per_step(model, monkeypatch, num_beams):
    """The prompt checks sync with the host: once per generate, however many tokens (and beams) follow."""
    calls = []
    check = FlamingoModel._check_prompt
    monkeypatch.setattr(FlamingoModel, "_check_prompt", lambda self, *args: calls.append(1) or check(self, *args))
    input_ids, attention_mask, vision_x = batch()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, vision_x=vision_x, num_beams=num_beams,
                         **{**GREEDY, "max_new_tokens": 6})
    assert out.shape[1] == input_ids.shape[1] + 6 and len(calls) == 1


# ---- batch sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_rows, image_rows", [(1, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_text_and_image_rows_must_match(model, entry, text_rows, image_rows):
    inputs = dict(input_ids=torch.tensor([[1, IMAGE, 5]] * text_rows), vision_x=image(image_rows))
    error = f"input_ids has {text_rows} rows but the images have {image_rows}"
    with pytest.raises(ValueError, match=error):
        model(**inputs) if entry == "forward" else model.generate(**inputs, **GREEDY)


def test_media_cache_and_masks_must_match_the_rows(model):
    input_ids = torch.tensor([[1, IMAGE, 5]])
    with torch.no_grad():
        media_cache = model(input_ids=input_ids, vision_x=image()).media_cache
    with pytest.raises(ValueError, match="input_ids has 2 rows but the images have 1"):
        model(input_ids=input_ids.repeat(2, 1), media_cache=media_cache)
    with pytest.raises(ValueError, match="attention_mask has 2 rows but input_ids has 1"):
        model(input_ids=input_ids, vision_x=image(), attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has 2 rows but input_ids has 1"):
        model.generate(input_ids=input_ids, vision_x=image(), attention_mask=torch.ones(2, 3, dtype=torch.long), **GREEDY)


def test_labels_must_have_the_shape_of_input_ids(model):
    input_ids = torch.tensor([[1, IMAGE, 5, 6]])
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\); expected input_ids' \(1, 4\)"):
        model(input_ids=input_ids, vision_x=image(), labels=input_ids[:, :3])
    with pytest.raises(ValueError, match="labels has 2 rows but input_ids has 1"):
        model(input_ids=input_ids, vision_x=image(), labels=input_ids.repeat(2, 1))


# ---- types, shapes, token ids -----------------------------------------------------------------------
@pytest.mark.parametrize("input_ids, error", [
    (torch.tensor([1, IMAGE, 5]), r"input_ids must be a 2-D tensor of token ids \(batch, tokens\); got \(3,\)"),
    (torch.tensor([[1.0, 98.0]]), r"got \(1, 2\) torch.float32"),
    ([[1, IMAGE, 5]], "got list"),
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids has no tokens"),
    (torch.tensor([[1, IMAGE, 100]]), r"token id 100, outside the vocabulary 0..99"),
    (torch.tensor([[1, IMAGE, -1]]), r"token id -1, outside the vocabulary 0..99"),
])
def test_bad_token_ids(model, input_ids, error):
    with pytest.raises(ValueError, match=error):
        model(input_ids=input_ids, vision_x=image())


@pytest.mark.parametrize("vision_x, error", [
    ((torch.rand(1, 1, 1, 3, 32, 32) * 255).to(torch.uint8), "vision_x is torch.uint8; pass normalized float pixel values"),
    (torch.randn(1, 1, 3, 32, 32), r"vision_x must be \(batch, images, frames, channels, height, width\); got shape \(1, 1, 3, 32, 32\)"),
    (image().numpy(), "vision_x must be a torch tensor .* got ndarray"),
    (torch.full((1, 1, 1, 3, 32, 32), float("nan")), "vision_x holds NaN or infinite values"),
    (image().index_fill(4, torch.tensor([3]), float("inf")), "vision_x holds NaN or infinite values"),
    (torch.randn(1, 1, 1, 3, 64, 64), r"Input image size \(64\*64\) doesn't match model \(32\*32\)"),  # CLIP's own check
])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_bad_vision_x(model, entry, vision_x, error):
    inputs = dict(input_ids=torch.tensor([[1, IMAGE, 5]]), vision_x=vision_x)
    with pytest.raises((TypeError, ValueError), match=error):
        model(**inputs) if entry == "forward" else model.generate(**inputs, **GREEDY)


def test_inputs_embeds_without_attended_image_is_refused(model):
    embeds = model.get_input_embeddings()(torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="with inputs_embeds, pass attended_image"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="pass input_ids"):
        model()


# ---- context length ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_model():
    """A model of 16 positions."""
    return tiny_model(text_config={**tiny_config().text_config.to_dict(), "max_position_embeddings": 16})


def test_prompt_longer_than_the_context_is_refused(short_model):
    long_prompt = torch.tensor([[1, IMAGE] + [5] * 15])  # 17 tokens
    assert short_model.config.context_length == 16
    with pytest.raises(ValueError, match="input_ids has 17 tokens, more than the language model's 16 positions"):
        short_model(input_ids=long_prompt, vision_x=image())
    with pytest.raises(ValueError, match="input_ids has 17 tokens, more than the language model's 16 positions"):
        short_model.generate(input_ids=long_prompt, vision_x=image(), **GREEDY)


def test_generation_past_the_context_is_refused(short_model):
    prompt = torch.tensor([[1, IMAGE] + [5] * 8])  # 10 tokens: room for 6
    with pytest.raises(ValueError, match="a 10-token prompt generating up to 20 tokens exceeds .* 16 positions; ask for at most 6"):
        short_model.generate(input_ids=prompt, vision_x=image(), **{**GREEDY, "max_new_tokens": 10})
    with pytest.raises(ValueError, match="generating up to 17 tokens"):
        short_model.generate(input_ids=prompt, vision_x=image(), **{**GREEDY, "max_new_tokens": None, "max_length": 17})
    out = short_model.generate(input_ids=prompt, vision_x=image(), **{**GREEDY, "max_new_tokens": 6})
    assert out.shape == (1, 16)


def test_a_huge_prompt_is_refused_before_any_work(model, monkeypatch):
    monkeypatch.setattr(model.vision_encoder, "forward", lambda *a, **k: pytest.fail("encoded images of a refused prompt"))
    huge = torch.full((1, 100_000), 5)
    huge[0, 1] = IMAGE
    with pytest.raises(ValueError, match="input_ids has 100000 tokens, more than the language model's 2048 positions"):
        model.generate(input_ids=huge, vision_x=image(), **GREEDY)


def test_mpt_context_is_max_seq_len():
    assert tiny_config("mpt").context_length == 128


# ---- cross_attn_every_n_layers -----------------------------------------------------------------------
@pytest.mark.parametrize("every, error", [
    (0, "cross_attn_every_n_layers must be >= 1, got 0"),
    (-2, "cross_attn_every_n_layers must be >= 1, got -2"),
    (5, r"cross_attn_every_n_layers=5 is more than the language model's 4 decoder layers, so no layer would get cross-attention; use 1..4"),
])
@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_cross_attn_every_n_layers_out_of_range(lm, every, error):
    with pytest.raises(ValueError, match=error):
        tiny_config(lm, cross_attn_every_n_layers=every)


def test_cross_attn_every_n_layers_at_the_layer_count_builds_one_block():
    model = FlamingoModel(tiny_config(cross_attn_every_n_layers=4))
    assert [layer.gated_cross_attn_layer is not None for layer in model.decoder_layers] == [False, False, False, True]


def test_splicing_refuses_a_period_longer_than_the_layer_list():
    """The model build checks the actual layer list too (a decoder_layers_attr_name may point at another one)."""
    config = tiny_config()
    language_model = FlamingoModel(config).lang_encoder.__class__(config.text_config)
    config.cross_attn_every_n_layers = 9
    with pytest.raises(ValueError, match=r"cross_attn_every_n_layers=9 puts cross-attention before no decoder layer of .*'s 4 \(at model.layers\)"):
        splice_cross_attention(language_model, config)


# ---- local folders and weight files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    tiny_model().save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "outputs/no-such-run/model"])
def test_missing_local_folder_says_so(name):
    with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
        FlamingoModel.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
        FlamingoProcessor.from_pretrained(name)


def test_hub_ids_are_not_local_paths(tmp_path):
    assert not looks_like_local_path("luodian/OTTER-Image-LLaMA7B-LA-InContext") and not looks_like_local_path("gpt2")
    check_local_model("luodian/OTTER-Image-LLaMA7B-LA-InContext")  # passes unchecked: the hub answers for it
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="weights.bin is a file; expected a model folder"):
        check_local_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("keep, error", [
    (0.5, r"model-00002-of-00006.safetensors \(shard 2 of 6\) is damaged: it has \d+ bytes but its tensors need \d+ \(truncated\)"),
    (4, r"model-00002-of-00006.safetensors \(shard 2 of 6\) is damaged: it has 4 bytes, fewer than the 8"),
    (12, r"model-00002-of-00006.safetensors \(shard 2 of 6\) is damaged: its header claims \d+ bytes but the file has 12"),
])
def test_truncated_shard_is_named(saved, tmp_path, keep, error):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    shard = folder / "model-00002-of-00006.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    before = tree_hashes(folder)
    with pytest.raises(ValueError, match=error):
        FlamingoModel.from_pretrained(folder)
    assert tree_hashes(folder) == before


def test_missing_shard_is_named(saved, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    (folder / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00006.safetensors \(shard 3 of 6\) is missing: model.safetensors.index.json lists it"):
        FlamingoModel.from_pretrained(folder)


def test_intact_folder_still_loads(saved):
    loaded = FlamingoModel.from_pretrained(saved)
    assert loaded.config.cross_attn_every_n_layers == 2


def test_processor_of_a_tokenizer_folder_still_loads():
    assert FlamingoProcessor.from_base_tokenizer(TINY_TOKENIZER_DIR).media_token_id is not None
