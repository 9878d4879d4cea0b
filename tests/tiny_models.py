"""Tiny Flamingo/Otter models built in code, for tests that must run in seconds on a CPU."""

from pathlib import Path

import torch

from flamingo import FlamingoConfig, FlamingoModel

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAMINGO_DIR = ROOT / "flamingo" / "assets" / "tiny-flamingo"
TINY_TOKENIZER_DIR = ROOT / "flamingo" / "assets" / "tiny-tokenizer"
TINY_OTTER_DIR = ROOT / "otter" / "assets" / "tiny-otter"

VOCAB = 100  # ids 97, 98, 99 = <|endofchunk|>, <image>, <PAD> (appended in the published order)
EOC, IMAGE, PAD = 97, 98, 99

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY_TEXT = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "mpt": dict(model_type="mpt", d_model=64, n_heads=4, n_layers=4, max_seq_len=128, no_bias=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128),
}


def tiny_config(lm: str = "llama", config_class=FlamingoConfig, **overrides) -> FlamingoConfig:
    settings = dict(
        vision_config=TINY_VISION,
        text_config={**TINY_TEXT[lm], "vocab_size": VOCAB},
        cross_attn_every_n_layers=2,
        perceiver_depth=2,
        perceiver_heads=2,
        perceiver_dim_head=16,
        perceiver_num_latents=8,
        cross_attn_heads=2,
        cross_attn_dim_head=16,
    )
    return config_class(**{**settings, **overrides})


def randomize_gates(model: FlamingoModel, seed: int = 0) -> FlamingoModel:
    """Fresh blocks have tanh gates at 0 (they ignore the images); open them so images matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.decoder_layers:
            block = layer.gated_cross_attn_layer
            if block is not None:
                block.attn_gate.copy_(torch.empty(1).uniform_(0.5, 1.0, generator=generator))
                block.ff_gate.copy_(-torch.empty(1).uniform_(0.5, 1.0, generator=generator))
    return model


def tiny_model(lm: str = "llama", seed: int = 0, open_gates: bool = True, **overrides) -> FlamingoModel:
    torch.manual_seed(seed)
    model = FlamingoModel(tiny_config(lm, **overrides)).eval()
    return randomize_gates(model, seed) if open_gates else model


def batch(seed: int = 0):
    """A left-padded batch: row 0 starts with an image and has 2; row 1 has text before its only image."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor(
        [
            [1, IMAGE, 10, 11, 12, EOC, IMAGE, 13, 14, 15],
            [PAD, PAD, PAD, 1, 20, 21, IMAGE, 22, 23, 24],
        ]
    )
    attention_mask = (input_ids != PAD).long()
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=generator)
    vision_x[1, 1] = 0  # row 1 has one image: its second slot is padding
    return input_ids, attention_mask, vision_x


