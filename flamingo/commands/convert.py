"""`flamingo-convert`: an OpenFlamingo `checkpoint.pt` or an Otter `final_weights.pt` -> a Hugging Face folder
(model + processor + model card + remote code), written atomically. The conversion is `flamingo.convert`;
docs/converting.md explains it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flamingo.arguments import int_at_least
from flamingo.cli import add_debug_flag, run_command

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo-convert",
        description="Convert an OpenFlamingo checkpoint.pt or an Otter final_weights.pt into a Hugging Face folder "
        "(model + processor) that loads with FlamingoModel/OtterModel.from_pretrained or AutoModel/AutoProcessor.",
        epilog="Example (OpenFlamingo-9B v2): flamingo-convert checkpoint.pt OpenFlamingo-9B-hf --lm anas-awadalla/mpt-7b "
        "--open-clip-model ViT-L-14 --open-clip-pretrained openai --cross-attn-every-n-layers 4",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt, final_weights.pt, or a training checkpoint (model_state_dict)")
    parser.add_argument("output_dir", type=Path, help="folder to write; created atomically")
    parser.add_argument("--lm", required=True, help="base causal language model the checkpoint was trained on (hub id or folder)")
    parser.add_argument("--tokenizer", help="base tokenizer, if not the --lm's (hub id or folder)")
    vision = parser.add_mutually_exclusive_group(required=True)
    vision.add_argument("--vision-encoder", help="transformers CLIP model (hub id or folder), e.g. openai/clip-vit-large-patch14")
    vision.add_argument("--open-clip-model", help="open_clip model name (e.g. ViT-L-14) or model-config .json file")
    parser.add_argument("--open-clip-pretrained", help="with --open-clip-model: pretrained tag (e.g. openai) or weights file")
    parser.add_argument("--cross-attn-every-n-layers", type=int_at_least(1), help="checked against the checkpoint; inferred from it if omitted")
    parser.add_argument("--target", choices=["flamingo", "otter"], default="flamingo", help="otter adds the <answer> token (default: flamingo)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32, as released)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only after a successful conversion)")
    add_debug_flag(parser)
    return parser


def _main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.open_clip_model and not args.open_clip_pretrained:
        parser.error("--open-clip-model needs --open-clip-pretrained (a tag such as openai, or a weights file)")
    if args.vision_encoder and args.open_clip_pretrained:
        parser.error("--open-clip-pretrained goes with --open-clip-model, not --vision-encoder")
    import torch

    from flamingo.convert import (
        conversion_record,
        convert_checkpoint,
        hf_vision_tower,
        open_clip_vision_tower,
        save_atomically,
    )

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if args.vision_encoder:
        vision_tower = hf_vision_tower(args.vision_encoder)
    else:
        vision_tower = open_clip_vision_tower(args.open_clip_model, args.open_clip_pretrained)
    model, processor = convert_checkpoint(
        args.checkpoint, args.lm, vision_tower, tokenizer=args.tokenizer, target=args.target,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers, dtype=dtype,
    )
    vision_encoder = args.vision_encoder or f"open_clip {args.open_clip_model} ({args.open_clip_pretrained})"
    conversion = conversion_record(args.checkpoint, args.lm, vision_encoder, args.target, dtype)
    output_dir = save_atomically(model, processor, args.output_dir, overwrite=args.overwrite, conversion=conversion)

    config = model.config
    blocks = [i for i, layer in enumerate(model.decoder_layers) if layer.gated_cross_attn_layer is not None]
    ids = {token: getattr(config, field) for field, token in config.token_id_fields.items()}
    ids[processor.tokenizer.pad_token] = processor.pad_token_id
    print(f"Wrote {output_dir} ({config.model_type}, {model.num_parameters():,} parameters, {args.dtype}) in {time.perf_counter() - start:.0f} s")
    print(f"  cross-attention every {config.cross_attn_every_n_layers} layers: before decoder layers {blocks}")
    print(f"  token ids {ids}; {config.text_config.vocab_size} embedding rows")


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
