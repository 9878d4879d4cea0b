"""save_pretrained / from_pretrained, the published key layout, Auto classes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import batch, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

from flamingo import FlamingoModel
from otter import OtterConfig, OtterModel


def logits(model):
    input_ids, attention_mask, vision_x = batch()
    with torch.no_grad():
        return model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask).logits


@pytest.mark.parametrize("lm", ["llama", "mpt", "opt", "gpt_neox"])
def test_sharded_round_trip_is_bit_identical(tmp_path, lm):
    model = tiny_model(lm)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded, info = FlamingoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(model), logits(reloaded))


def test_saved_files_use_the_published_layout(tmp_path, model):
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "vision_encoder.vision_model.embeddings.class_embedding" in keys
    assert "lang_encoder.model.layers.1.decoder_layer.self_attn.q_proj.weight" in keys
    assert "lang_encoder.model.layers.1.gated_cross_attn_layer.feed_forward.1.weight" in keys
    assert "perceiver.layers.0.feed_forward.3.weight" in keys
    assert not any(k.startswith("vision_encoder.embeddings") for k in keys)
    assert len(keys) == len(model.state_dict())  # no aliases, no duplicates


def published_state_dict(model):
    """The state dict as Otter's transformers-4.30 code saved it: CLIP under vision_model, fp32, with
    the persistent buffers of that time."""
    state = {}
    for key, tensor in model.state_dict().items():
        state[key.replace("vision_encoder.", "vision_encoder.vision_model.", 1)] = tensor.float().clone()
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for i in range(model.config.text_config.num_hidden_layers):
        state[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    num_positions = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    state["vision_encoder.vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]
    return state


def test_published_bin_shards_load_with_nothing_missing_or_unexpected(tmp_path, model):
    state = published_state_dict(model)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for filename, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, tmp_path / filename)
    weight_map = {k: f for f, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    config = model.config.to_dict()
    for field in ("media_token_id", "endofchunk_token_id"):
        config.pop(field)  # published configs do not store them: derived from the vocabulary
    (tmp_path / "config.json").write_text(json.dumps(config))

    reloaded, info = FlamingoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert reloaded.config.media_token_id == model.config.media_token_id
    assert torch.equal(logits(model), logits(reloaded))


def test_wrong_architecture_fails_before_building_anything(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="holds a `llama` checkpoint, not a `flamingo` one"):
        FlamingoModel.from_pretrained(tmp_path / "llama")
    tiny_model().save_pretrained(tmp_path / "flamingo")
    with pytest.raises(ValueError, match="holds a `flamingo` checkpoint, not a `otter` one"):
        OtterModel.from_pretrained(tmp_path / "flamingo")


def test_auto_classes_dispatch_on_model_type(tmp_path):
    torch.manual_seed(0)
    otter = OtterModel(tiny_config(config_class=OtterConfig)).eval()
    otter.save_pretrained(tmp_path / "otter")
    tiny_model().save_pretrained(tmp_path / "flamingo")
    assert type(AutoModel.from_pretrained(tmp_path / "otter")) is OtterModel
    assert type(AutoModel.from_pretrained(tmp_path / "flamingo")) is FlamingoModel
    config = AutoConfig.from_pretrained(tmp_path / "otter")
    assert type(config) is OtterConfig and config.answer_token_id == 98 - 1 + 1 and config.media_token_id == 97


def test_published_config_fields_load_and_unknown_ones_are_kept():
    published = {
        "model_type": "otter", "architectures": ["OtterModel"], "cross_attn_every_n_layers": 4, "only_attend_previous": True,
        "use_media_placement_augmentation": True, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.30.1", "max_num_frames": 128, "train_full_model": False, "lora_config": {"r": 16},
        "text_config": {"_name_or_path": "luodian/llama-7b-hf", "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32004, "pad_token_id": 0},
        "vision_config": {"_name_or_path": "openai/clip-vit-large-patch14", "model_type": "clip_vision_model", "hidden_size": 1024,
                          "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 224, "patch_size": 14},
    }
    config = OtterConfig.from_dict(published)
    assert (config.endofchunk_token_id, config.media_token_id, config.answer_token_id) == (32000, 32001, 32002)
    assert config.lora_config == {"r": 16} and config.train_full_model is False and config.max_num_frames == 128
