#!/usr/bin/env python
"""Write the model configs shipped in the packages' assets (flamingo/assets, otter/assets): the tiny ones used by
tests, examples and defaults, and the real 9B ones (OpenFlamingo-9B on LLaMA-7B and MPT-7B, Otter-9B), for planning
and conversion.

    python scripts/make_configs.py
"""

import argparse
from pathlib import Path

from flamingo import FlamingoConfig
from otter import OtterConfig

ROOT = Path(__file__).resolve().parents[1]

CLIP_VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
MPT_7B = dict(model_type="mpt", d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, no_bias=True, attn_config={"alibi": True}, tie_word_embeddings=True)

# Tiny: vocab = the tiny tokenizer's 591 base tokens + the added ones (see scripts/make_tiny_assets.py).
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8, hidden_act="quick_gelu")
TINY_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TINY_SPLICE = dict(cross_attn_every_n_layers=2, perceiver_depth=2, perceiver_heads=4, perceiver_dim_head=16, perceiver_num_latents=8, cross_attn_heads=4, cross_attn_dim_head=32)

CONFIGS = {
    "tiny-flamingo": FlamingoConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 594}, **TINY_SPLICE),
    "tiny-otter": OtterConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 595}, **TINY_SPLICE),
    # The tiny Otter with 8 frame embeddings, for video (the toy video task, otter/data/toy_video.py).
    "tiny-otter-video": OtterConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 595}, max_num_frames=8, **TINY_SPLICE),
    # luodian/openflamingo-9b-hf: OpenFlamingo-9B v1, LLaMA-7B + 3 added tokens.
    "openflamingo-9b-llama": FlamingoConfig(vision_config=CLIP_VIT_L_14, text_config={**LLAMA_7B, "vocab_size": 32003}, cross_attn_every_n_layers=4),
    # luodian/otter-9b-hf, OTTER-Image-LLaMA7B-LA-InContext: + <answer>.
    "otter-9b-llama": OtterConfig(vision_config=CLIP_VIT_L_14, text_config={**LLAMA_7B, "vocab_size": 32004}, cross_attn_every_n_layers=4),
    # luodian/OTTER-Video-LLaMA7B-DenseCaption: the same + 128 frame embeddings (perceiver.frame_embs [128, 1024]).
    "otter-video-llama7b": OtterConfig(vision_config=CLIP_VIT_L_14, text_config={**LLAMA_7B, "vocab_size": 32004}, cross_attn_every_n_layers=4, max_num_frames=128),
    # OpenFlamingo-9B v2 (MPT-7B): gpt-neox-20b's 50277 tokens + 3; resize_token_embeddings shrank wte to 50280.
    "openflamingo-9b-mpt7b": FlamingoConfig(vision_config=CLIP_VIT_L_14, text_config={**MPT_7B, "vocab_size": 50280}, cross_attn_every_n_layers=4),
    # OTTER-Image-MPT7B: wte padded back to 50432 rows, so the ids must be stored.
    "otter-9b-mpt7b": OtterConfig(vision_config=CLIP_VIT_L_14, text_config={**MPT_7B, "vocab_size": 50432}, cross_attn_every_n_layers=4,
                                  endofchunk_token_id=50277, media_token_id=50278, answer_token_id=50279),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    for name, config in CONFIGS.items():
        folder = ROOT / config.model_type / "assets" / name  # each package ships its own model type's configs
        config.save_pretrained(folder)
        print(f"wrote {folder / 'config.json'}")


if __name__ == "__main__":
    main()
