#!/usr/bin/env python
"""Generation speed of FlamingoModel against the bare LlamaForCausalLM with the same decoder weights.

Both generate the same number of tokens greedily from the same prompt (one image for Flamingo), in
interleaved rounds so that machine noise hits both alike. The last line is the ratio of their speeds:

    generate_ratio_vs_bare_lm=0.87

The default config has 9B proportions scaled down (LLaMA hidden 1024, 8 layers, cross-attention every
4 layers, ViT width 256 at 224 px, the real perceiver and cross-attention widths), where the gated
cross-attention adds about 16% to the decoder's FLOPs, as at 9B.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from flamingo import FlamingoConfig, FlamingoModel

SCALED_9B = dict(
    vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=224, patch_size=14, hidden_act="quick_gelu"),
    text_config=dict(model_type="llama", hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=32003),
    cross_attn_every_n_layers=4,
)
TINY = dict(
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=595),
    cross_attn_every_n_layers=2, perceiver_depth=2, perceiver_num_latents=8,
)


def build_models(config: FlamingoConfig, dtype: torch.dtype) -> tuple[FlamingoModel, torch.nn.Module]:
    torch.manual_seed(0)
    flamingo = FlamingoModel(config).to(dtype).eval()
    bare = AutoModelForCausalLM.from_config(config.text_config).to(dtype).eval()
    decoder = {k.replace(".decoder_layer.", "."): v for k, v in flamingo.lang_encoder.state_dict().items() if "gated_cross_attn_layer" not in k}
    bare.load_state_dict(decoder)
    return flamingo, bare


def time_generate(model, inputs: dict, new_tokens: int) -> float:
    """Seconds for one greedy generate of exactly `new_tokens` tokens."""
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    seconds = time.perf_counter() - start
    assert output.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["scaled-9b", "tiny"], default="scaled-9b")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    config = FlamingoConfig(**(SCALED_9B if args.config == "scaled-9b" else TINY))
    flamingo, bare = build_models(config, getattr(torch, args.dtype))
    text = torch.randint(3, config.endofchunk_token_id, (args.batch, args.prompt_tokens))
    text[:, 1 : 1 + args.images * 4 : 4] = config.media_token_id  # one <image> every 4 tokens from position 1
    size = config.vision_config.image_size
    vision_x = torch.randn(args.batch, args.images, 1, 3, size, size, dtype=getattr(torch, args.dtype))
    systems = {"bare LlamaForCausalLM": (bare, {"input_ids": text}), "FlamingoModel": (flamingo, {"input_ids": text, "vision_x": vision_x})}

    with torch.inference_mode():
        for model, inputs in systems.values():  # warm-up
            time_generate(model, inputs, 4)
        seconds = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, (model, inputs) in systems.items():
                seconds[name].append(time_generate(model, inputs, args.new_tokens))

    print(f"config={args.config} dtype={args.dtype} batch={args.batch} images={args.images} prompt={args.prompt_tokens} "
          f"new_tokens={args.new_tokens} rounds={args.rounds} threads={torch.get_num_threads()}")
    print(f"{'system':<24}{'median s':>10}{'best s':>10}{'tokens/s':>10}")
    speed = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        speed[name] = args.batch * args.new_tokens / median
        print(f"{name:<24}{median:>10.3f}{min(times):>10.3f}{speed[name]:>10.1f}")
    print(f"generate_ratio_vs_bare_lm={speed['FlamingoModel'] / speed['bare LlamaForCausalLM']:.2f}")


if __name__ == "__main__":
    main()
