"""Bad flags and files given to the commands: flamingo-memory, flamingo-convert, and the demo's uploads.

Flags are checked while parsing, so a bad one is an argparse usage error (exit 2) naming the flag, before any
work starts and before anything is written."""

import struct
import zlib

import pytest
import torch
from refusals import tree_hashes, usage_error
from tiny_models import tiny_config

from flamingo.arguments import parse_gpus
from flamingo.commands.convert import build_parser as convert_parser
from flamingo.commands.convert import main as convert_main
from flamingo.commands.memory import parse_args as memory_args
from flamingo.convert import cross_attention_every, load_checkpoint
from flamingo.memory import plan_memory
from otter.conversation import MAX_IMAGE_SIDE, InputError, load_image


# ---- flamingo-memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, error", [
    (["--gpus", "0x24GB", "--strategy", "ddp"], "argument --gpus: GPUs must be at least one GPU of more than 0 GB"),
    (["--gpus", "0x24GB", "--strategy", "device_map"], "argument --gpus: GPUs must be at least one GPU"),
    (["--gpus", "4x0GB", "--strategy", "ddp"], "argument --gpus: GPUs must be at least one GPU of more than 0 GB"),
    (["--gpus", "24XB"], "argument --gpus: GPUs must look like 4x24GB, 1x80GB or 80GB; got '24XB'"),
    (["--gpus=-1x24GB"], "argument --gpus: GPUs must look like"),
    (["--batch", "-3"], "argument --batch: must be at least 1, got -3"),
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--batch", "1.5"], "argument --batch: expected an integer, got '1.5'"),
    (["--seq", "0"], "argument --seq: must be at least 1, got 0"),
    (["--images=-1"], "argument --images: must be at least 0, got -1"),
    (["--margin", "1"], "argument --margin: must be a fraction, 0 <= value < 1; got 1.0"),
    (["--margin=-0.1"], "argument --margin: must be a fraction"),
    (["--gpus", "2x24GB"], "--strategy single runs on one GPU, but --gpus 2x24GB has more"),
    (["--strategy", "pipeline"], "argument --strategy: invalid choice: 'pipeline'"),
])
def test_memory_flags(capsys, flags, error):
    assert error in usage_error(memory_args, ["tiny-otter", *flags], capsys)


def test_memory_api_refuses_the_same_values():
    config = tiny_config()
    with pytest.raises(ValueError, match="GPUs must be at least one GPU"):
        parse_gpus("0x24GB")
    for kwargs, error in [({"batch": -3}, "batch must be at least 1, got -3"), ({"seq": 0}, "seq must be at least 1"),
                          ({"images": -1}, "images must be at least 0"), ({"margin": 1.0}, "0 <= margin < 1")]:
        with pytest.raises(ValueError, match=error):
            plan_memory(config, gpus="1x24GB", **kwargs)
    with pytest.raises(ValueError, match="GPUs must be at least one GPU"):
        plan_memory(config, gpus="0x24GB", strategy="device_map")


def test_memory_good_flags_still_plan(capsys):
    args = memory_args(["tiny-otter", "--gpus", "2x24GB", "--strategy", "device_map", "--batch", "2", "--images", "0"])
    plan = plan_memory(tiny_config(), gpus=args.gpus, strategy=args.strategy, batch=args.batch, images=args.images)
    assert plan.fits and len(plan.gpus) == 2 and all(gpu.activations >= 0 for gpu in plan.gpus)


# ---- flamingo-convert --------------------------------------------------------------------------------
CONVERT = ["checkpoint.pt", "{out}", "--lm", "lm", "--vision-encoder", "clip"]


@pytest.mark.parametrize("value, error", [
    ("0", "argument --cross-attn-every-n-layers: must be at least 1, got 0"),
    ("-4", "argument --cross-attn-every-n-layers: must be at least 1, got -4"),
    ("two", "argument --cross-attn-every-n-layers: expected an integer, got 'two'"),
])
def test_convert_refuses_bad_cross_attention_periods_before_writing(tmp_path, capsys, value, error):
    out = tmp_path / "out"
    argv = [arg.format(out=out) for arg in CONVERT] + ["--cross-attn-every-n-layers", value]
    assert error in usage_error(convert_main, argv, capsys)
    assert not out.exists()


def test_convert_api_refuses_periods_outside_the_layers():
    weights = {f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.attn_gate": torch.zeros(1) for i in (1, 3)}
    for every in (0, 5, -1):
        with pytest.raises(ValueError, match=f"cross_attn_every_n_layers={every} must be between 1 and the language model's 4"):
            cross_attention_every(weights, "model.layers", 4, every)
    assert cross_attention_every(weights, "model.layers", 4, None) == 2


def test_convert_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_checkpoint(tmp_path)


def test_convert_help_names_the_flag():
    assert "--cross-attn-every-n-layers" in convert_parser().format_help()


# ---- demo uploads ------------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size; Pillow reads only the header before refusing a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_huge_png_is_too_many_pixels_not_not_an_image(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_header(30000, 30000))
    with pytest.raises(InputError, match=rf"huge.png has too many pixels \(900,000,000 pixels\); images are limited to {MAX_IMAGE_SIDE} px a side"):
        load_image(tmp_path / "huge.png")


@pytest.mark.parametrize("content, name", [(b"not a picture", "notes.txt"), (b"", "empty.png"), (b"\x89PNG\r\n\x1a\n", "cut.png")])
def test_files_that_are_not_images(tmp_path, content, name):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=f"{name} is not an image"):
        load_image(tmp_path / name)


def test_a_text_file_in_an_example_slot_gets_the_demo_message(tmp_path):
    pytest.importorskip("gradio", reason="otter-demo needs gradio (pip install -e '.[demo]')")
    import gradio as gr
    from gradio.data_classes import ImageData

    from otter.webui import examples_from_slots, image_slot

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    upload = ImageData(path=str(notes), orig_name="notes.txt")
    with pytest.raises(OSError):  # what gradio's own image preprocessing does with it
        gr.Image(type="filepath").preprocess(upload)
    before = tree_hashes(tmp_path)
    path = image_slot(label="Example 1").preprocess(upload)
    assert path == str(notes)
    with pytest.raises(InputError, match="notes.txt is not an image"):
        examples_from_slots([path, "What colour?", "red"])
    assert tree_hashes(tmp_path) == before
