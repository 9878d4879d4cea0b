"""Parity with the reference implementation (open-flamingo 2.0.1): seeded tiny OpenFlamingo models built by
`openflamingo_reference.py` (beside this file), converted from their released-format files (checkpoint.pt + lm/ +
open_clip config and weights) by the converter, must give the reference's logits and greedy generations.

The reference inputs are a left-padded batch whose second row has text before its first image, and whose third
image slot of that row is padding."""

import functools
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from openflamingo_reference import CLIP_NAME, MAX_NEW_TOKENS, build_reference
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from flamingo import FlamingoModel, FlamingoProcessor
from flamingo.convert import convert, open_clip_vision_tower
from otter import OtterModel

pytestmark = pytest.mark.slow

ATOL = 1e-4


class Variant(NamedTuple):
    lm: str
    every: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.lm}-every{self.every}-seed{self.seed}"


VARIANTS = [Variant("llama", 1, 0), Variant("llama", 2, 1), Variant("llama", 4, 2), Variant("mpt", 1, 3), Variant("mpt", 2, 4), Variant("mpt", 4, 5)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like the reference builds: on tensors this small, extra threads cost more than they give (and on a busy
    machine, far more), and one thread is the most reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> Callable[[Variant], Path]:
    """`references(variant)`: its reference folder, built at first use. In this process, one after another: a
    build takes seconds once torch, transformers and open_clip are imported, which a process of its own would pay
    again (most of a build's time), and the builder leaves nothing behind that could change another test: it forks
    the random generator, restores the thread count, and patches only open_flamingo's classes (its open_clip
    config is registered under a name of its own)."""
    for module in ("open_flamingo", "einops_exts"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install --no-deps open-flamingo==2.0.1 einops-exts")
    root = tmp_path_factory.mktemp("openflamingo-references")

    @functools.cache
    def build(variant: Variant) -> Path:
        return build_reference(root / variant.name, variant.lm, variant.every, variant.seed)

    return build


@dataclass
class Converted:
    variant: Variant
    reference_dir: Path
    folder: Path
    model: FlamingoModel
    inputs: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    meta: dict


def released_vision_tower(reference_dir: Path):
    return open_clip_vision_tower(reference_dir / f"open_clip/{CLIP_NAME}.json", reference_dir / "open_clip/open_clip_model.safetensors")


@pytest.fixture(scope="session")
def conversions(references, tmp_path_factory):
    """`conversions(variant)`: its checkpoint.pt converted to a folder and loaded back with AutoModel, once."""
    done: dict[Variant, Converted] = {}

    def get(variant: Variant) -> Converted:
        if variant not in done:
            reference_dir = references(variant)
            folder = convert(
                reference_dir / "checkpoint.pt", tmp_path_factory.mktemp(variant.name) / "hf", reference_dir / "lm",
                released_vision_tower(reference_dir), cross_attn_every_n_layers=variant.every,
            )
            done[variant] = Converted(
                variant, reference_dir, folder, AutoModel.from_pretrained(folder).eval(),
                load_file(reference_dir / "inputs.safetensors"), load_file(reference_dir / "reference.safetensors"),
                json.loads((reference_dir / "meta.json").read_text()),
            )
        return done[variant]

    return get


@pytest.fixture(scope="session", params=VARIANTS, ids=lambda v: v.name)
def converted(request, conversions) -> Converted:
    return conversions(request.param)


def forward(model: FlamingoModel, inputs: dict[str, torch.Tensor], **kwargs):
    with torch.no_grad():
        return model(input_ids=inputs["lang_x"], vision_x=inputs["vision_x"], attention_mask=inputs["attention_mask"], **kwargs)


def test_inputs_have_left_padding_and_text_before_the_first_image(converted):
    """Guards the claims below: the reference batch exercises both."""
    input_ids, attention_mask = converted.inputs["lang_x"], converted.inputs["attention_mask"]
    media = input_ids == converted.meta["tokens"]["media_token_id"]
    first_image = media.int().argmax(dim=1)
    first_real = attention_mask.int().argmax(dim=1)
    assert (attention_mask[:, 0] == 0).any()
    assert ((first_image - first_real) > 1).any()  # real tokens after BOS and before the first <image>


def test_logits_and_loss_match_the_reference(converted):
    assert type(converted.model) is FlamingoModel
    assert converted.model.config.cross_attn_every_n_layers == converted.variant.every
    output = forward(converted.model, converted.inputs, labels=converted.inputs["labels"])
    real = converted.inputs["attention_mask"].bool()
    difference = (output.logits - converted.reference["logits"]).abs()[real].max().item()
    loss_difference = (output.loss - converted.reference["loss"][0]).abs().item()
    print(f"{converted.variant.name}: max |logit difference| {difference:.2e}, |loss difference| {loss_difference:.2e}")
    assert difference <= ATOL
    assert loss_difference <= ATOL


def test_image_features_keep_openflamingo_semantics(converted):
    """Patch tokens before ln_post, as OpenFlamingo was trained (open_clip <= 2.20), and the perceiver on them."""
    vision_x = converted.inputs["vision_x"]
    with torch.no_grad():
        pixels = vision_x.flatten(0, 2)
        tokens = converted.model.vision_encoder(pixel_values=pixels).last_hidden_state[:, 1:]
        latents = converted.model.encode_images(vision_x).latents
    torch.testing.assert_close(tokens, converted.reference["vision_tokens"].flatten(0, 2), rtol=0, atol=ATOL)
    torch.testing.assert_close(latents, converted.reference["perceiver_out"], rtol=0, atol=ATOL)


def test_text_before_the_first_image_does_not_see_images(converted):
    other = dict(converted.inputs, vision_x=torch.randn(converted.inputs["vision_x"].shape, generator=torch.Generator().manual_seed(7)))
    changed = (forward(converted.model, other).logits - forward(converted.model, converted.inputs).logits).abs().amax(-1)
    media = converted.inputs["lang_x"] == converted.meta["tokens"]["media_token_id"]
    real = converted.inputs["attention_mask"].bool()
    before_image = (media.cumsum(-1) == 0) & real
    assert before_image.any()
    assert changed[before_image].max() == 0
    assert changed[~before_image & real].min() > 0


def test_greedy_generation_matches_the_reference(converted):
    inputs, pad = converted.inputs, converted.meta["tokens"]["pad_token_id"]
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
    batched = converted.model.generate(input_ids=inputs["lang_x"], vision_x=inputs["vision_x"], attention_mask=inputs["attention_mask"], **kwargs)
    row0 = converted.model.generate(input_ids=inputs["lang_x"][:1], vision_x=inputs["vision_x"][:1], attention_mask=inputs["attention_mask"][:1], **kwargs)
    assert torch.equal(batched, converted.reference["generated_ids"])
    assert torch.equal(row0, converted.reference["generated_ids_row0"])


def test_saved_processor_has_the_reference_ids_and_legacy_llama_tokenization(converted):
    """Same special-token ids as the reference. Text: the reference ran its LLaMA-class tokenizer under transformers
    5, whose default (`legacy=False`) no longer starts the text after a special token as a new word (`<image>a` ->
    `a`, not `▁a`); the checkpoints were trained with the sentencepiece behaviour (`legacy=True`), which the
    converted processor keeps. Loaded each way, the base tokenizer reproduces the reference's ids and ours."""
    processor = AutoProcessor.from_pretrained(converted.folder)
    tokens = converted.meta["tokens"]
    assert (processor.endofchunk_token_id, processor.media_token_id, processor.pad_token_id) == (tokens["eoc_token_id"], tokens["media_token_id"], tokens["pad_token_id"])
    prompts = converted.meta["prompts"]

    def ids(tokenizer) -> torch.Tensor:
        return tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]

    base = converted.reference_dir / "lm"
    assert torch.equal(ids(FlamingoProcessor.from_base_tokenizer(base).tokenizer), converted.inputs["lang_x"])
    assert torch.equal(ids(processor.tokenizer), ids(FlamingoProcessor.from_base_tokenizer(base, legacy=True).tokenizer))


def test_round_trip_through_save_pretrained_is_identical(conversions, tmp_path):
    """converted folder -> from_pretrained -> save_pretrained -> from_pretrained (one variant: saving does not
    depend on the decoder)."""
    converted = conversions(VARIANTS[0])
    converted.model.save_pretrained(tmp_path)
    reloaded = FlamingoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(forward(reloaded, converted.inputs).logits, forward(converted.model, converted.inputs).logits)


# --- Otter --------------------------------------------------------------------------------------------------------


def otter_final_weights(reference_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The reference as Otter would have saved it: Otter's names, `<answer>` at V+2 and `<PAD>` at V+3, and the
    output head (Otter trains it). Also returns the random `<answer>` rows it made up (input, output)."""
    checkpoint = torch.load(reference_dir / "checkpoint.pt", weights_only=True)
    head = load_file(reference_dir / "lm/model.safetensors")["lm_head.weight"]
    renamed = {}
    for key, tensor in checkpoint.items():
        key = re.sub(r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.", key)
        key = re.sub(r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward.", key)
        renamed[key.replace(".gated_cross_attn_layer.ff.", ".gated_cross_attn_layer.feed_forward.")] = tensor
    key = "lang_encoder.model.embed_tokens.weight"
    embedding = renamed[key]
    base = embedding.shape[0] - 3
    generator = torch.Generator().manual_seed(0)
    answer_row, answer_head_row = (torch.randn(embedding.shape[1], generator=generator) for _ in range(2))
    renamed[key] = torch.cat([embedding[: base + 2], answer_row[None], embedding[base + 2 :]])
    renamed["lang_encoder.lm_head.weight"] = torch.cat([head[: base + 2], answer_head_row[None], head[base + 2 :]])
    return renamed, answer_row, answer_head_row


@pytest.mark.parametrize("source", ["openflamingo", "otter"])
def test_otter_conversion_keeps_the_reference_behaviour(references, tmp_path, source):
    """OpenFlamingo checkpoint -> Otter (rows moved, `<answer>` new), and an Otter-layout `final_weights.pt` (LLaMA,
    `<answer>` present): both convert, reload as OtterModel, and give the reference's logits for every token."""
    reference_dir = references(VARIANTS[1])
    inputs, reference = load_file(reference_dir / "inputs.safetensors"), load_file(reference_dir / "reference.safetensors")
    base = reference["logits"].shape[-1] - 3
    checkpoint = reference_dir / "checkpoint.pt"
    if source == "otter":
        checkpoint = tmp_path / "final_weights.pt"
        final_weights, answer_row, answer_head_row = otter_final_weights(reference_dir)
        torch.save(final_weights, checkpoint)

    folder = convert(checkpoint, tmp_path / "hf", reference_dir / "lm", released_vision_tower(reference_dir), target="otter")
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model) is OtterModel
    assert model.config.answer_token_id == AutoProcessor.from_pretrained(folder).answer_token_id == base + 2
    if source == "otter":
        assert torch.equal(model.get_input_embeddings().weight[base + 2], answer_row)
        assert torch.equal(model.get_output_embeddings().weight[base + 2], answer_head_row)

    input_ids = inputs["lang_x"].clone()
    input_ids[input_ids == base + 2] = base + 3  # <PAD> moved from V+2 to V+3
    logits = forward(model, dict(inputs, lang_x=input_ids)).logits
    columns = [*range(base + 2), base + 3]  # the reference's tokens, in the reference's order
    real = inputs["attention_mask"].bool()
    assert (logits[..., columns] - reference["logits"]).abs()[real].max() <= ATOL
