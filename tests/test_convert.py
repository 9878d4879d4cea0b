"""The checkpoint converter (flamingo/convert.py) on tiny models built in code: key mapping for every LM family and
checkpoint flavour, token rows, refusals, atomic writing and the CLI. Parity with the reference implementation
itself is in test_parity_openflamingo.py."""

import re
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import ModelCard
from open_clip.model import CLIP, _build_vision_tower
from tiny_models import TINY_TEXT, TINY_TOKENIZER_DIR, TINY_VISION, randomize_gates
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
)

from flamingo import FlamingoConfig, FlamingoModel, FlamingoProcessor
from flamingo.commands.convert import main
from flamingo.convert import (
    convert,
    convert_checkpoint,
    hf_vision_tower,
    load_base_tokenizer,
    load_checkpoint,
    open_clip_quick_gelu,
    open_clip_vision_config,
    open_clip_vision_to_hf,
    openflamingo_to_hf,
    save_atomically,
)
from otter import OtterConfig, OtterModel

TOKENIZER = TINY_TOKENIZER_DIR
V = 591  # the tiny tokenizer's base vocabulary: <|endofchunk|> = V, <image> = V+1, then <PAD> (Otter: <answer>, <PAD>)
EMBEDDING = {"llama": "model.embed_tokens", "mpt": "transformer.wte", "gpt_neox": "gpt_neox.embed_in"}
LAYERS = {"llama": "model.layers", "mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers"}


# --- building OpenFlamingo-style files from a model made in code ------------------------------------------------


def source_model(lm: str = "llama", config_class=FlamingoConfig, vocab: int = V + 3, seed: int = 0) -> FlamingoModel:
    """A model with every weight random (norms and gates included), so that a swapped or dropped key shows. The
    perceiver and cross-attention sizes are OpenFlamingo's fixed ones (the config defaults)."""
    torch.manual_seed(seed)
    config = config_class(vision_config=TINY_VISION, text_config={**TINY_TEXT[lm], "vocab_size": vocab}, cross_attn_every_n_layers=2)
    model_class = OtterModel if config_class is OtterConfig else FlamingoModel
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return randomize_gates(model, seed)


def openflamingo_name(key: str) -> str:
    """This library's key -> open_flamingo 2.0.1's (the inverse of the documented renames)."""
    key = re.sub(r"^perceiver\.layers\.(\d+)\.feed_forward\.", r"perceiver.layers.\1.1.", key)
    key = re.sub(r"^perceiver\.layers\.(\d+)\.(?!1\.)", r"perceiver.layers.\1.0.", key)
    return key.replace(".gated_cross_attn_layer.feed_forward.", ".gated_cross_attn_layer.ff.")


def trained_weights(model: FlamingoModel, lm: str) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's checkpoint filter keeps: perceiver, gated cross-attention, every `embed` weight."""
    state = model.state_dict()
    keep = [k for k in state if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]
    keep.append(f"lang_encoder.{EMBEDDING[lm]}.weight")
    checkpoint = {openflamingo_name(k): state[k].clone() for k in keep}
    if lm == "gpt_neox":  # transformers 4.x named the head `embed_out`, so the filter kept it
        checkpoint["lang_encoder.embed_out.weight"] = state["lang_encoder.lm_head.weight"].clone()
    return checkpoint


def save_base_language_model(model: FlamingoModel, folder: Path, rows: int | None = None) -> None:
    """The frozen LM the checkpoint sits on, with the base tokenizer. Its input embedding is deliberately stale:
    the checkpoint's must win. `rows` cuts the vocabulary (LLaMA-7B's own has no rows for the added tokens)."""
    lm = AutoModelForCausalLM.from_config(model.config.text_config)
    state = {k.replace(".decoder_layer.", "."): v for k, v in model.lang_encoder.state_dict().items() if "gated_cross_attn_layer" not in k}
    lm.load_state_dict(state, strict=True)
    with torch.no_grad():
        lm.get_input_embeddings().weight.add_(1.0)
    if rows is not None:
        lm.resize_token_embeddings(rows)
    lm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)


def save_vision_tower(model: FlamingoModel, folder: Path) -> None:
    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict({k.removeprefix("vision_encoder."): v for k, v in model.state_dict().items() if k.startswith("vision_encoder.")})
    clip.save_pretrained(folder)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """`release(lm)` -> (source model, folder with checkpoint.pt, lm/ and clip/), built once per LM family."""
    built = {}

    def build(lm: str):
        if lm not in built:
            root = tmp_path_factory.mktemp(f"release-{lm}")
            model = source_model(lm)
            torch.save(trained_weights(model, lm), root / "checkpoint.pt")
            save_base_language_model(model, root / "lm")
            save_vision_tower(model, root / "clip")
            built[lm] = model, root
        return built[lm]

    return build


def logits(model: FlamingoModel) -> torch.Tensor:
    """Logits of a left-padded batch with text before the first image."""
    input_ids = torch.tensor([[1, V + 1, 10, 11, V, V + 1, 12, 13], [V + 2, V + 2, 1, 20, 21, V + 1, 22, 23]])
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids, vision_x=vision_x, attention_mask=(input_ids != V + 2).long()).logits


def assert_same_weights(model: FlamingoModel, expected: FlamingoModel) -> None:
    state, expected_state = model.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(state[key], tensor), key


# --- open_clip vision tower -------------------------------------------------------------------------------------

VISION_CFG = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}


def open_clip_tower(**vision_cfg):
    torch.manual_seed(0)
    tower = _build_vision_tower(embed_dim=32, vision_cfg={**VISION_CFG, **vision_cfg, "output_tokens": True}, quick_gelu=True).eval()
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # LayerNorms off 1/0, so a swapped norm shows
    return tower


@pytest.mark.parametrize("final_ln_after_pool", [True, False])
def test_open_clip_tower_maps_exactly_onto_clip_vision_model(final_ln_after_pool):
    """The model takes CLIP's hidden states before post_layernorm. open_clip <= 2.20 (OpenFlamingo's) returned those
    tokens; later versions apply ln_post to them unless final_ln_after_pool: the model keeps the old semantics."""
    tower = open_clip_tower(final_ln_after_pool=final_ln_after_pool)
    config = open_clip_vision_config({"quick_gelu": True, "vision_cfg": VISION_CFG})
    clip = CLIPVisionModel(config).eval()
    clip.load_state_dict(open_clip_vision_to_hf(tower.state_dict()), strict=True)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled, tokens = tower(pixels)
        hidden = clip(pixel_values=pixels).last_hidden_state
    assert config.hidden_act == "quick_gelu"
    torch.testing.assert_close(pooled, clip.post_layernorm(hidden[:, 0]) @ tower.proj, rtol=0, atol=1e-5)
    if final_ln_after_pool:
        torch.testing.assert_close(tokens, hidden[:, 1:], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(tokens, clip.post_layernorm(hidden[:, 1:]), rtol=0, atol=1e-5)
        assert (tokens - hidden[:, 1:]).abs().max() > 0.1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"ls_init_value": 0.1}, "ls_init_value"),
        ({"attentional_pool": True}, "attentional_pool"),
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"pos_embed_type": "sin_cos_2d"}, "pos_embed_type"),
        ({"layers": [3, 4, 6, 3]}, "ResNet"),
        ({"image_size": [32, 48]}, "not square"),
    ],
)
def test_open_clip_settings_without_a_clip_equivalent_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        open_clip_vision_config({"vision_cfg": {**VISION_CFG, **setting}})


@pytest.mark.parametrize(
    ("name", "pretrained", "expected"),
    [("ViT-L-14", "openai", True), ("ViT-L-14", __file__, False), ("ViT-L-14-quickgelu", __file__, True)],
)
def test_quick_gelu_follows_the_weights_the_tag_was_trained_with(name, pretrained, expected):
    """open_clip's ViT-L-14 config says GELU; its `openai` weights (OpenFlamingo's) are QuickGELU."""
    assert open_clip_quick_gelu(open_clip.get_model_config(name), name, pretrained) is expected


# --- key layouts ------------------------------------------------------------------------------------------------


def test_v1_alias_keys_and_whole_clip_convert_like_v2():
    """OpenFlamingo v1 files hold `gated_cross_attn_layers.<i>` aliases and the whole CLIP (`vision_encoder.visual.*`,
    text tower unused); the result must be the v2 one, each tensor once."""
    model = source_model()
    v2 = trained_weights(model, "llama")
    torch.manual_seed(0)
    clip = CLIP(embed_dim=32, vision_cfg=VISION_CFG, text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}, quick_gelu=True)
    v2 |= {f"vision_encoder.{k}": v for k, v in clip.visual.state_dict().items()}
    aliases = {re.sub(r"model\.layers\.(\d+)\.gated_cross_attn_layer\.", r"gated_cross_attn_layers.\1.", k): v for k, v in v2.items() if "gated" in k}
    v1 = {k: v for k, v in v2.items() if not k.startswith("vision_encoder.")} | {f"vision_encoder.{k}": v for k, v in clip.state_dict().items()}
    expected = openflamingo_to_hf(v2, "model.layers")
    only_aliases = {k: v for k, v in v1.items() if "gated_cross_attn_layer." not in k} | aliases
    for state in (v1 | aliases, only_aliases):
        converted = openflamingo_to_hf(state, "model.layers")
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert any(k.startswith("vision_encoder.encoder.layers.1.self_attn.q_proj") for k in expected)


def test_llama_tokenizers_load_legacy_as_in_training(tmp_path):
    """transformers 5 loads LLaMA tokenizers with legacy=False unless told; the checkpoints were trained legacy."""
    AutoTokenizer.from_pretrained(TOKENIZER, legacy=False).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).legacy is False
    tokenizer = load_base_tokenizer(tmp_path)
    assert tokenizer.legacy is True
    assert tokenizer.tokenize("</s>red") == ["</s>", "▁red"]


def test_training_checkpoint_with_ddp_prefix_loads_like_the_release(tmp_path, release):
    _, root = release("llama")
    plain = load_checkpoint(root / "checkpoint.pt")
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in plain.items()}}, tmp_path / "train.pt")
    wrapped = load_checkpoint(tmp_path / "train.pt")
    assert wrapped.keys() == plain.keys()
    assert all(torch.equal(wrapped[k], plain[k]) for k in plain)


# --- whole conversions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lm", ["llama", "mpt", "gpt_neox"])
def test_release_converts_back_to_the_model_it_came_from(tmp_path, release, lm):
    """checkpoint.pt + base LM + CLIP -> a folder that AutoModel/AutoProcessor load alone, equal to the source model
    in every weight (LLaMA untied; MPT tied `wte`; GPT-NeoX `embed_out` -> `lm_head`)."""
    model, root = release(lm)
    out = convert(root / "checkpoint.pt", tmp_path / "out", root / "lm", hf_vision_tower(root / "clip"), cross_attn_every_n_layers=2)
    converted = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(converted) is FlamingoModel and type(processor) is FlamingoProcessor
    assert_same_weights(converted, model)
    assert torch.equal(logits(converted), logits(model))
    assert (processor.endofchunk_token_id, processor.media_token_id, processor.pad_token_id) == (V, V + 1, V + 2)
    assert (converted.config.endofchunk_token_id, converted.config.media_token_id) == (V, V + 1)
    assert converted.generation_config.eos_token_id == V and converted.generation_config.pad_token_id == V + 2
    assert converted.decoder_layers_path == LAYERS[lm]
    if lm == "mpt":  # tied again after loading, not two copies
        assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight


def test_otter_final_weights_convert_unchanged(tmp_path, release):
    """Otter's `final_weights.pt` is already in this library's naming, with `<answer>` at V+2 and the output head."""
    flamingo, root = release("llama")
    otter = source_model("llama", OtterConfig, vocab=V + 4)
    state = flamingo.state_dict()
    for key in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"):
        rows = state[key]
        state[key] = torch.cat([rows[: V + 2], torch.randn(1, rows.shape[1]), rows[V + 2 :]])
    otter.load_state_dict(state)
    keep = [k for k in state if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed_tokens" in k or "lm_head" in k]
    torch.save({k: state[k] for k in keep}, tmp_path / "final_weights.pt")

    out = convert(tmp_path / "final_weights.pt", tmp_path / "out", root / "lm", hf_vision_tower(root / "clip"), target="otter")
    converted = AutoModel.from_pretrained(out)
    assert type(converted) is OtterModel
    assert_same_weights(converted, otter)
    assert (converted.config.answer_token_id, AutoProcessor.from_pretrained(out).answer_token_id) == (V + 2, V + 2)


def test_a_full_state_dict_in_the_published_layout_converts(tmp_path, release):
    """A whole model saved by Otter's transformers-4.30 code: CLIP under `vision_model`, stale rotary/position
    buffers. Every weight comes from the file, so the base LM and CLIP given are only its skeleton."""
    model, root = release("llama")
    state = {k.replace("vision_encoder.", "vision_encoder.vision_model.", 1): v for k, v in model.state_dict().items()}
    state["lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    state["vision_encoder.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, tmp_path / "full.pt")
    other = source_model(seed=1)
    save_base_language_model(other, tmp_path / "lm")
    save_vision_tower(other, tmp_path / "clip")
    converted, _ = convert_checkpoint(tmp_path / "full.pt", tmp_path / "lm", hf_vision_tower(tmp_path / "clip"))
    assert_same_weights(converted, model)


def test_openflamingo_to_otter_moves_pad_and_starts_answer_at_the_mean(release):
    """OpenFlamingo rows: eoc V, image V+1, PAD V+2. Otter's: eoc V, image V+1, answer V+2, PAD V+3."""
    model, root = release("llama")
    converted, processor = convert_checkpoint(root / "checkpoint.pt", root / "lm", hf_vision_tower(root / "clip"), target="otter")
    assert (processor.answer_token_id, processor.pad_token_id, converted.config.text_config.vocab_size) == (V + 2, V + 3, V + 4)
    for name in ("embed_tokens", "lm_head"):
        source = next(t for k, t in model.state_dict().items() if name in k)
        rows = next(t for k, t in converted.state_dict().items() if name in k)
        assert torch.equal(rows[: V + 2], source[: V + 2])
        assert torch.equal(rows[V + 3], source[V + 2])
        torch.testing.assert_close(rows[V + 2], source[:V].mean(dim=0))


def test_a_base_lm_without_rows_for_the_added_tokens_gets_mean_rows(tmp_path, release):
    """Like LLaMA-7B (32000 rows): OpenFlamingo grew the frozen head at random and never saved it."""
    model, root = release("llama")
    save_base_language_model(model, tmp_path / "lm", rows=V)
    converted, _ = convert_checkpoint(root / "checkpoint.pt", tmp_path / "lm", hf_vision_tower(root / "clip"))
    head, source = converted.lang_encoder.lm_head.weight, model.lang_encoder.lm_head.weight
    assert head.shape[0] == V + 3
    assert torch.equal(head[:V], source[:V])
    torch.testing.assert_close(head[V:], source[:V].mean(dim=0).expand(3, -1))
    assert torch.equal(converted.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_bfloat16_conversion(release):
    _, root = release("llama")
    converted, _ = convert_checkpoint(root / "checkpoint.pt", root / "lm", hf_vision_tower(root / "clip"), dtype=torch.bfloat16)
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}


# --- refusals ---------------------------------------------------------------------------------------------------


def convert_edited(tmp_path, release, edit, lm: str = "llama", **kwargs):
    """Convert the release after `edit(checkpoint dict)`, against the llama base LM."""
    model, root = release(lm)
    checkpoint = trained_weights(model, lm)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "edited.pt")
    _, llama_root = release("llama")
    return convert_checkpoint(tmp_path / "edited.pt", llama_root / "lm", hf_vision_tower(llama_root / "clip"), **kwargs)


def test_a_language_model_state_dict_is_not_a_flamingo_checkpoint(tmp_path, release):
    _, root = release("llama")
    torch.save(AutoModelForCausalLM.from_pretrained(root / "lm").state_dict(), tmp_path / "lm.pt")
    with pytest.raises(ValueError, match="not an OpenFlamingo/Otter checkpoint"):
        load_checkpoint(tmp_path / "lm.pt")


@pytest.mark.parametrize("content", ["pickled module", "text"])
def test_files_that_need_unpickling_or_are_not_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save({"perceiver.latents": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match=r"torch\.load\(weights_only=True\)"):
        load_checkpoint(path)


def test_wrong_cross_attn_every_n_layers_is_refused_with_the_right_value(tmp_path, release):
    with pytest.raises(ValueError, match=r"=4 puts cross-attention before decoder layers \[3\].*layers \[1, 3\].*matches cross_attn_every_n_layers=2"):
        convert_edited(tmp_path, release, lambda c: None, cross_attn_every_n_layers=4)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, release):
    def edit(checkpoint):
        checkpoint["perceiver.latents"] = torch.zeros(64, 48)

    with pytest.raises(ValueError, match=r"checkpoint key 'perceiver\.latents' has shape \[64, 48\].*expects \[64, 32\]"):
        convert_edited(tmp_path, release, edit)


def test_a_vocabulary_without_room_for_the_special_tokens_is_refused(tmp_path, release):
    def edit(checkpoint):
        checkpoint["lang_encoder.model.embed_tokens.weight"] = checkpoint["lang_encoder.model.embed_tokens.weight"][: V + 1]

    with pytest.raises(ValueError, match=rf"need {V + 3} embedding rows, but the checkpoint's embedding has {V + 1}"):
        convert_edited(tmp_path, release, edit)


def test_a_checkpoint_of_another_language_model_family_is_refused(tmp_path, release):
    with pytest.raises(ValueError, match=r"lang_encoder\.transformer\.blocks.*lang_encoder\.model\.layers"):
        convert_edited(tmp_path, release, lambda c: None, lm="mpt")


def test_a_truncated_checkpoint_is_refused(tmp_path, release):
    with pytest.raises(ValueError, match="lacks 1 of the"):
        convert_edited(tmp_path, release, lambda c: c.pop("perceiver.layers.5.1.3.weight"))


# --- writing ----------------------------------------------------------------------------------------------------


def test_an_existing_folder_is_kept_without_overwrite(tmp_path, release):
    _, root = release("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("good")
    with pytest.raises(FileExistsError):
        convert(root / "checkpoint.pt", tmp_path / "out", root / "lm", hf_vision_tower(root / "clip"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "good"


def test_a_failed_write_leaves_the_old_folder_and_no_debris(tmp_path, release, monkeypatch):
    _, root = release("llama")
    model, processor = convert_checkpoint(root / "checkpoint.pt", root / "lm", hf_vision_tower(root / "clip"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("good")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(processor), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_atomically(model, processor, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "good"


def test_overwrite_replaces_the_folder_only_after_success(tmp_path, release):
    _, root = release("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    convert(root / "checkpoint.pt", tmp_path / "out", root / "lm", hf_vision_tower(root / "clip"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--open-clip-pretrained" in capsys.readouterr().out


def test_cli_converts_and_summarises(tmp_path, release, capsys):
    model, root = release("llama")
    main([str(root / "checkpoint.pt"), str(tmp_path / "out"), "--lm", str(root / "lm"), "--vision-encoder", str(root / "clip")])
    summary = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'out'} (flamingo" in summary and "before decoder layers [1, 3]" in summary
    assert_same_weights(FlamingoModel.from_pretrained(tmp_path / "out"), model)


def test_the_cli_model_card_names_what_was_converted(tmp_path, release):
    _, root = release("llama")
    main([str(root / "checkpoint.pt"), str(tmp_path / "out"), "--lm", str(root / "lm"), "--vision-encoder", str(root / "clip")])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model is None  # local folders are not hub ids
    assert f"Converted with `flamingo-convert` from `{root / 'checkpoint.pt'}`." in card.text
    assert f"| language model | `{root / 'lm'}` |" in card.text and "| target | `flamingo` |" in card.text
    assert "# out\n" in card.text  # named after the folder, not the staging folder it was written in


def test_a_parity_figure_given_to_convert_is_in_the_model_card(tmp_path, release):
    _, root = release("llama")
    parity = "max |logit diff| 2.3e-6 against open_flamingo 2.0.1"
    out = convert(root / "checkpoint.pt", tmp_path / "out", root / "lm", hf_vision_tower(root / "clip"), vision_encoder="openai/clip-vit-large-patch14", parity=parity)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["openai/clip-vit-large-patch14"]
    assert f"Parity: {parity}" in card.text


def test_cli_refusal_is_a_message_not_a_traceback(tmp_path, release, capsys):
    _, root = release("llama")
    assert main([str(root / "checkpoint.pt"), str(tmp_path / "out"), "--lm", str(root / "lm"), "--vision-encoder", str(root / "clip"), "--cross-attn-every-n-layers", "4"]) == 2
    assert "error: cross_attn_every_n_layers=4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
