"""Seeded tiny OpenFlamingo references for the parity tests, made by the reference implementation itself.

`build_reference(folder, lm, cross_attn_every_n_layers, seed)` builds a tiny OpenFlamingo with open_flamingo 2.0.1's
own factory (scripts/reference_factory.py) on a LLaMA or an MPT decoder, and writes what OpenFlamingo releases, so
that the converter is tested on the files it is meant for, and what the reference computes on a fixed batch:

    lm/                                   the base LM: config, weights, tokenizer (without OpenFlamingo's tokens)
    open_clip/OF-tiny-ViT.json            the open_clip config, and beside it open_clip_model.safetensors
    checkpoint.pt                         the released format: trained parameters and input embeddings
    inputs.safetensors                    vision_x, lang_x, attention_mask, labels
    reference.safetensors                 logits, loss, vision_tokens, perceiver_out, generated_ids (the batch),
                                          generated_ids_row0 (its first row alone, unpadded)
    meta.json                             the special-token ids and the prompts

Every weight a converter could get wrong is made to matter: the gates are open (fresh ones ignore the images), the
norms random (fresh ones are 1 and 0), and the input embeddings moved off the LM folder's, so that only those in
checkpoint.pt give the reference's logits. The batch is left padded, its second row has text before its first image
and an all-zero image slot (as OpenFlamingo's evaluation pads), and the generations are checked against a greedy loop
of full forward passes, so that the ids compared with are the model's and not an artefact of running open_flamingo
under transformers 5. MPT is transformers' own (ALiBi, tied head), not the `mosaic_gpt` remote code of the released
3B, which lives on the Hub; the checkpoint keys that matter (`transformer.wte`, the cross-attention blocks) are named
alike in both.
"""

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from reference_factory import build_open_flamingo, open_gates, randomize_norms, release_checkpoint, save_open_clip
from safetensors.torch import save_file
from tiny_models import TINY_TEXT, TINY_TOKENIZER_DIR
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

CLIP_NAME = "OF-tiny-ViT"
CLIP_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 16, "layers": 2}  # 16 patch tokens
PROMPTS = [  # the first is the longest: alone, it is a batch without padding
    "<image>a red circle<|endofchunk|><image>two blue squares and a small star<|endofchunk|><image>question: what is it? answer:",
    "what is on the left?<image>a green triangle<|endofchunk|><image>how many?",
]
MAX_NEW_TOKENS = 8


@contextmanager
def isolated(seed: int) -> Iterator[None]:
    """Seed the global generator (the factory initialises the perceiver and cross-attention from it) and use one
    thread (the most reproducible), leaving the caller's generator state and thread count as they were."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def save_base_tokenizer(folder: Path) -> int:
    """The tiny LLaMA tokenizer, its config without `legacy`, like the released LLaMA folders that predate the flag
    (transformers 5 then tokenizes as legacy=False, which the processor test depends on). Returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_TOKENIZER_DIR / "tokenizer.json", folder)
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config.pop("legacy", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(AutoTokenizer.from_pretrained(folder))


def save_language_model(folder: Path, lm: str, vocab_size: int, generator: torch.Generator) -> None:
    """The decoder, with rows for OpenFlamingo's three tokens already (the factory's resize then keeps every row),
    and weights large enough (initializer_range 0.1) that greedy decoding is not decided by float noise."""
    config = AutoConfig.for_model(**TINY_TEXT[lm], vocab_size=vocab_size, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    randomize_norms(model, generator)
    model.save_pretrained(folder)


def make_trained_weights_matter(model: nn.Module, generator: torch.Generator) -> None:
    open_gates(model, generator)
    randomize_norms(model.perceiver, generator)
    randomize_norms(model.lang_encoder.gated_cross_attn_layers, generator)
    with torch.no_grad():
        embedding = model.lang_encoder.get_input_embeddings().weight
        embedding.add_(0.02 * torch.randn(embedding.shape, generator=generator))


def reference_inputs(tokenizer, media_token_id: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The prompts left padded, random pixels for each `<image>` and zeros for the slots a row does not use; labels
    are the ids, ignored (-100) at padding, at `<image>` and at the first position."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    lang_x, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    images = [prompt.count("<image>") for prompt in PROMPTS]
    size = CLIP_VISION["image_size"]
    vision_x = torch.zeros(len(PROMPTS), max(images), 1, 3, size, size)
    for row, count in enumerate(images):
        vision_x[row, :count] = torch.randn(count, 1, 3, size, size, generator=generator)
    labels = lang_x.masked_fill((attention_mask == 0) | (lang_x == media_token_id), -100)
    labels[:, 0] = -100
    return {"vision_x": vision_x, "lang_x": lang_x, "attention_mask": attention_mask, "labels": labels}


def greedy_by_full_forwards(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy decoding without any cache: one whole forward pass per new token."""
    ids, attention_mask = inputs["lang_x"], inputs["attention_mask"]
    for _ in range(MAX_NEW_TOKENS):
        logits = model(vision_x=inputs["vision_x"], lang_x=ids, attention_mask=attention_mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return ids


@torch.no_grad()
def reference_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    vision_x, lang_x, attention_mask = inputs["vision_x"], inputs["lang_x"], inputs["attention_mask"]
    patch_tokens = model.vision_encoder(vision_x.flatten(0, 2))[1]  # (images, patches, width): before ln_post
    vision_tokens = patch_tokens.reshape(*vision_x.shape[:3], *patch_tokens.shape[1:])
    output = model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask, labels=inputs["labels"])
    options = dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False, pad_token_id=pad_token_id)
    generated = model.generate(vision_x, lang_x, attention_mask, **options)
    greedy = greedy_by_full_forwards(model, inputs)
    if not torch.equal(generated, greedy[:, : generated.shape[1]]):
        raise RuntimeError(f"open_flamingo's generate gave {generated.tolist()}, its greedy forward passes {greedy.tolist()}")
    return {
        "logits": output.logits,
        "loss": output.loss.reshape(1),
        "vision_tokens": vision_tokens,
        "perceiver_out": model.perceiver(vision_tokens),
        "generated_ids": generated,
        # a row without padding: transformers 5 then leaves the attention mask out (the patch's first fix)
        "generated_ids_row0": model.generate(vision_x[:1], lang_x[:1], attention_mask[:1], **options),
    }


def build_reference(folder: Path, lm: str, cross_attn_every_n_layers: int, seed: int) -> Path:
    """Build the reference in `folder` (see the module docstring) and return it; `lm` is "llama" or "mpt"."""
    generator = torch.Generator().manual_seed(seed)
    with isolated(seed):
        vocab_size = save_base_tokenizer(folder / "lm") + 3
        save_language_model(folder / "lm", lm, vocab_size, generator)
        _, clip_weights = save_open_clip(folder / "open_clip", CLIP_NAME, CLIP_VISION, generator)
        model, tokenizer = build_open_flamingo(CLIP_NAME, clip_weights, folder / "lm", cross_attn_every_n_layers)
        make_trained_weights_matter(model, generator)
        torch.save(release_checkpoint(model), folder / "checkpoint.pt")
        inputs = reference_inputs(tokenizer, model.media_token_id, generator)
        reference = reference_outputs(model, inputs, tokenizer.pad_token_id)
    save_file({name: tensor.contiguous() for name, tensor in inputs.items()}, folder / "inputs.safetensors")
    save_file({name: tensor.contiguous() for name, tensor in reference.items()}, folder / "reference.safetensors")
    tokens = {"eoc_token_id": model.eoc_token_id, "media_token_id": model.media_token_id, "pad_token_id": tokenizer.pad_token_id}
    (folder / "meta.json").write_text(json.dumps({"tokens": tokens, "prompts": PROMPTS}, indent=2))
    return folder
