"""Processors: special-token ids and add order, prompt/image alignment, padding, save/load, Otter's prompt format and
answer decoding. Uses the committed tiny processor folders (`scripts/make_tiny_assets.py`)."""


import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_FLAMINGO_DIR, TINY_OTTER_DIR, TINY_TOKENIZER_DIR
from transformers import AutoTokenizer, CLIPImageProcessor

from flamingo.processing_flamingo import FlamingoProcessor
from otter.processing_otter import OTTER_CHAT_TEMPLATE, OtterProcessor, build_prompt

# The tiny models' vocab_size is BASE_VOCAB + 3 (Flamingo) / + 4 (Otter): these ids are a contract with them.
BASE_VOCAB = 591
FLAMINGO_IDS = {"<|endofchunk|>": 591, "<image>": 592, "<PAD>": 593}
OTTER_IDS = {"<|endofchunk|>": 591, "<image>": 592, "<answer>": 593, "<PAD>": 594}
BOS = 1


@pytest.fixture(scope="module")
def base_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def flamingo():
    return FlamingoProcessor.from_pretrained(TINY_FLAMINGO_DIR)


@pytest.fixture(scope="module")
def otter():
    return OtterProcessor.from_pretrained(TINY_OTTER_DIR)


def image(colour: str, size: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


def pixels(processor: FlamingoProcessor, img) -> torch.Tensor:
    return processor.image_processor([img], return_tensors="pt")["pixel_values"][0]


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


# --- special tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("flamingo", FLAMINGO_IDS), ("otter", OTTER_IDS)])
def test_committed_processors_have_the_contract_ids(request, base_tokenizer, name, expected):
    processor = request.getfixturevalue(name)
    assert len(base_tokenizer) == BASE_VOCAB
    assert {token: processor.tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    assert len(processor.tokenizer) == BASE_VOCAB + len(expected)
    assert processor.media_token_id == expected["<image>"]
    assert processor.endofchunk_token_id == expected["<|endofchunk|>"]
    assert processor.pad_token_id == expected["<PAD>"]


def test_otter_answer_token_id(otter):
    assert otter.answer_token_id == OTTER_IDS["<answer>"]


@pytest.mark.parametrize("processor_class", [FlamingoProcessor, OtterProcessor])
def test_from_base_tokenizer_appends_special_tokens_then_pad_in_order(base_tokenizer, processor_class):
    processor = processor_class.from_base_tokenizer(base_tokenizer, image_processor=tiny_image_processor())
    tokens = [*processor_class.config_class.special_tokens, "<PAD>"]
    ids = processor.tokenizer.convert_tokens_to_ids(tokens)
    assert ids == list(range(len(base_tokenizer), len(base_tokenizer) + len(tokens)))
    assert processor.tokenizer.pad_token == "<PAD>"
    assert len(base_tokenizer) == BASE_VOCAB, "the caller's tokenizer must not be modified"


@pytest.mark.parametrize("processor_class", [FlamingoProcessor, OtterProcessor])
def test_from_base_tokenizer_accepts_a_path(processor_class, base_tokenizer):
    from_path = processor_class.from_base_tokenizer(TINY_TOKENIZER_DIR, image_processor=tiny_image_processor())
    from_object = processor_class.from_base_tokenizer(base_tokenizer, image_processor=tiny_image_processor())
    assert from_path.tokenizer.get_added_vocab() == from_object.tokenizer.get_added_vocab()


def test_from_base_tokenizer_keeps_an_existing_pad_token(base_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR, pad_token="</s>")
    processor = FlamingoProcessor.from_base_tokenizer(tokenizer)
    assert processor.pad_token_id == 2
    assert len(processor.tokenizer) == len(base_tokenizer) + 2
    assert "<PAD>" not in processor.tokenizer.get_vocab()


def test_from_base_tokenizer_defaults_to_clip_preprocessing(base_tokenizer):
    processor = FlamingoProcessor.from_base_tokenizer(base_tokenizer)
    assert processor.image_processor.crop_size["height"] == 224
    assert processor(text="<image>", images=image("red"))["vision_x"].shape == (1, 1, 1, 3, 224, 224)


def test_a_tokenizer_without_the_special_tokens_is_rejected(base_tokenizer):
    with pytest.raises(ValueError, match="from_base_tokenizer"):
        FlamingoProcessor(image_processor=tiny_image_processor(), tokenizer=base_tokenizer)


@pytest.mark.parametrize("token", ["<image>", "<|endofchunk|>", "<answer>"])
def test_each_special_token_is_one_token(otter, token):
    token_id = otter.tokenizer.convert_tokens_to_ids(token)
    assert otter.tokenizer(token).input_ids == [BOS, token_id]
    ids = otter.tokenizer(f"a red{token}circle").input_ids
    assert [i for i in ids if i >= BASE_VOCAB] == [token_id]
    assert otter.tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"


def test_text_after_a_special_token_starts_a_word(flamingo):
    """The tiny tokenizer is `legacy` like the LLaMA tokenizers of the original training: the text after `<image>`
    gets a word-start marker. Also checks that the flag survived saving (transformers does not save it by itself)."""
    tokens = flamingo.tokenizer.convert_ids_to_tokens(flamingo.tokenizer("<image>User").input_ids)
    assert tokens == ["<s>", "<image>", "\u2581User"]


# --- __call__ ---------------------------------------------------------------------------------------------------


def test_batches_are_left_padded(flamingo):
    long_prompt, short_prompt = "<image>a photo of a small red circle in the top left corner", "<image>a star"
    batch = flamingo(text=[long_prompt, short_prompt], images=[[image("red")], [image("blue")]])
    short_ids = flamingo.tokenizer(short_prompt).input_ids
    n_pad = batch["input_ids"].shape[1] - len(short_ids)
    assert n_pad > 0
    assert batch["input_ids"][1].tolist() == [flamingo.pad_token_id] * n_pad + short_ids
    assert batch["attention_mask"][1].tolist() == [0] * n_pad + [1] * len(short_ids)
    assert batch["attention_mask"][0].all()
    assert batch["input_ids"].dtype == torch.long


def test_vision_x_shape_order_and_zero_padding(flamingo):
    red, green, blue = image("red"), image("green"), image("blue")
    batch = flamingo(
        text=["<image>a red circle<|endofchunk|><image>a green star", "<image>a blue ring"],
        images=[[red, green], [blue]],
    )
    vision_x = batch["vision_x"]
    assert vision_x.shape == (2, 2, 1, 3, 32, 32)
    assert vision_x.dtype == torch.float32
    torch.testing.assert_close(vision_x[0, 0, 0], pixels(flamingo, red))
    torch.testing.assert_close(vision_x[0, 1, 0], pixels(flamingo, green))
    torch.testing.assert_close(vision_x[1, 0, 0], pixels(flamingo, blue))
    assert vision_x[1, 0].abs().sum() > 0
    assert torch.equal(vision_x[1, 1], torch.zeros_like(vision_x[1, 1]))


def test_a_flat_image_list_is_split_over_prompts_by_markers(flamingo):
    texts = ["<image>a red circle<image>a green star", "<image>a blue ring"]
    red, green, blue = image("red"), image("green"), image("blue")
    nested = flamingo(text=texts, images=[[red, green], [blue]])
    flat = flamingo(text=texts, images=[red, green, blue])
    assert torch.equal(flat["vision_x"], nested["vision_x"])
    assert torch.equal(flat["input_ids"], nested["input_ids"])


def test_a_single_prompt_with_a_single_image(flamingo):
    batch = flamingo(text="<image>a red circle", images=image("red"))
    assert batch["input_ids"].shape[0] == 1
    assert batch["vision_x"].shape == (1, 1, 1, 3, 32, 32)


def test_numpy_and_tensor_images_match_pil(flamingo):
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    hwc = np.array(pil)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    vision_x = flamingo(text="<image>x<image>y<image>z", images=[pil, hwc, chw])["vision_x"]
    torch.testing.assert_close(vision_x[0, 1], vision_x[0, 0])
    torch.testing.assert_close(vision_x[0, 2], vision_x[0, 0])


def test_text_only_batch_has_no_vision_x(flamingo):
    batch = flamingo(text=["a photo of a red circle", "two stars"])
    assert set(batch.keys()) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape[0] == 2


def test_text_is_required(flamingo):
    with pytest.raises(ValueError, match="needs `text`"):
        flamingo(images=image("red"))


@pytest.mark.parametrize(
    ("text", "images", "message"),
    [
        (
            ["<image>a", "<image>b"],
            [[image("red")], [image("red"), image("blue")]],
            r"Prompt 1 has 1 <image> marker\(s\) but 2 image\(s\)",
        ),
        ("<image>a<image>b", [image("red")], r"Prompt 0 has 2 <image> marker\(s\) but 1 image\(s\)"),
        ("<image>a red circle", None, r"Prompt 0 has 1 <image> marker\(s\) but 0 image\(s\)"),
        ("a red circle", image("red"), r"Prompt 0 has 0 <image> marker\(s\) but 1 image\(s\)"),
        (["<image>a", "<image>b"], [[image("red")]], "Got 1 lists of images for 2 prompts"),
        (
            ["<image>a", "<image><image>b"],
            [image("red")] * 2,
            r"3 <image> markers in all \(\[1, 2\] per prompt\) but 2 images",
        ),
        (["<image>a", "<image>b"], [[image("red")], image("blue")], "not a mix"),
    ],
)
def test_image_count_mismatch_is_an_error(flamingo, text, images, message):
    with pytest.raises(ValueError, match=message):
        flamingo(text=text, images=images)


@pytest.mark.parametrize(
    ("text", "images", "error", "message"),
    [
        ("<image>a", "red.jpg", TypeError, "image 0 of prompt 0 is a str"),
        (
            ["<image>a", "<image>b<image>c"],
            [[image("red")], [image("red"), 3]],
            TypeError,
            "image 1 of prompt 1 is a int",
        ),
        (
            "<image>a",
            torch.zeros(2, 3, 32, 32),
            ValueError,
            r"image 0 of prompt 0 has shape \(2, 3, 32, 32\); expected a single image",
        ),
        ("<image>a", np.zeros((32, 32), dtype=np.uint8), ValueError, r"image 0 of prompt 0 has shape \(32, 32\)"),
    ],
)
def test_a_non_image_is_an_error_naming_it(flamingo, text, images, error, message):
    with pytest.raises(error, match=message):
        flamingo(text=text, images=images)


# --- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flamingo", "otter"])
def test_save_and_load_round_trip(request, tmp_path, name):
    processor = request.getfixturevalue(name)
    processor.save_pretrained(tmp_path)
    reloaded = type(processor).from_pretrained(tmp_path)

    texts = ["<image>User: What colour is the shape? GPT:<answer> red<|endofchunk|><image>User: Where", "<image>a"]
    images = [[image("red"), image("cyan")], [image("pink", (60, 20))]]
    before, after = processor(text=texts, images=images), reloaded(text=texts, images=images)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert reloaded.tokenizer.padding_side == "left"
    assert reloaded.tokenizer.get_added_vocab() == processor.tokenizer.get_added_vocab()
    assert reloaded.chat_template == processor.chat_template


# --- Otter prompt format ----------------------------------------------------------------------------------------


def otter_conversation(examples, question):
    messages = []
    for q, a in examples:
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return messages


EXAMPLES = [("What colour is the shape?", "red"), ("How many shapes are there?", "three")]
QUESTION = "Where is the star?"


def test_build_prompt_is_otters_format():
    assert build_prompt(QUESTION, EXAMPLES) == (
        "<image>User: What colour is the shape? GPT:<answer> red<|endofchunk|>"
        "<image>User: How many shapes are there? GPT:<answer> three<|endofchunk|>"
        "<image>User: Where is the star? GPT:<answer>"
    )
    assert build_prompt(QUESTION) == "<image>User: Where is the star? GPT:<answer>"


@pytest.mark.parametrize("source", ["committed", "from_base_tokenizer"])
def test_chat_template_matches_build_prompt(otter, base_tokenizer, source):
    processor = otter if source == "committed" else OtterProcessor.from_base_tokenizer(base_tokenizer)
    rendered = processor.apply_chat_template(
        otter_conversation(EXAMPLES, QUESTION), add_generation_prompt=True, tokenize=False
    )
    assert rendered == build_prompt(QUESTION, EXAMPLES)


def test_committed_chat_template_is_up_to_date(otter):
    assert otter.chat_template == OTTER_CHAT_TEMPLATE


def test_chat_template_accepts_string_content(otter):
    conversation = [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "a star"}]
    assert (
        otter.apply_chat_template(conversation, tokenize=False)
        == "User: What shape is it? GPT:<answer> a star<|endofchunk|>"
    )


def test_chat_template_rejects_other_roles(otter):
    with pytest.raises(Exception, match="only user and assistant"):
        otter.apply_chat_template([{"role": "system", "content": "Be brief."}], tokenize=False)


def test_tokenized_chat_template_matches_calling_the_processor(otter):
    images = [image("red"), image("green"), image("blue")]
    conversation = otter_conversation(EXAMPLES, QUESTION)
    for message, img in zip([m for m in conversation if m["role"] == "user"], images, strict=True):
        message["content"][0]["image"] = img
    from_template = otter.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = otter(text=build_prompt(QUESTION, EXAMPLES), images=images)
    assert torch.equal(from_template["input_ids"], direct["input_ids"])
    assert torch.equal(from_template["vision_x"], direct["vision_x"])


def test_flamingo_has_no_chat_template(flamingo):
    assert flamingo.chat_template is None


# --- decode_answers ---------------------------------------------------------------------------------------------


def words(processor, text):
    return processor.tokenizer.encode(text, add_special_tokens=False)


def test_flamingo_decode_answers_cuts_at_endofchunk(flamingo):
    eoc, pad, media = flamingo.endofchunk_token_id, flamingo.pad_token_id, flamingo.media_token_id
    prompt = [[pad, BOS, media, *words(flamingo, "a photo of")], [BOS, media, *words(flamingo, "an image of two")]]
    continuations = [
        [*words(flamingo, "a red circle"), eoc, *words(flamingo, "the star"), pad],
        [*words(flamingo, "blue stars"), eoc, media, *words(flamingo, "a red"), eoc],
    ]
    assert [len(p) for p in prompt] == [len(prompt[0])] * 2, "test rows must be rectangular"
    rows = torch.tensor([p + c for p, c in zip(prompt, continuations, strict=True)])
    assert flamingo.decode_answers(rows, prompt_length=len(prompt[0])) == ["a red circle", "blue stars"]
    assert flamingo.decode_answers(continuations) == ["a red circle", "blue stars"]
    assert flamingo.decode_answers(continuations[0]) == ["a red circle"], "a single sequence"


def test_flamingo_decode_answers_without_endofchunk_keeps_everything(flamingo):
    ids = [*words(flamingo, " two small squares "), 2]
    assert flamingo.decode_answers([ids]) == ["two small squares"]


def test_otter_decode_answers_takes_text_after_the_last_answer_token(otter):
    prompt = build_prompt(QUESTION, EXAMPLES)
    answers = [" in the top left corner", " in the middle"]
    full = [otter.tokenizer(prompt + answer + "<|endofchunk|>" + "<image>User: junk").input_ids for answer in answers]
    assert otter.decode_answers(full) == ["in the top left corner", "in the middle"]

    cut_short = otter.tokenizer(prompt + " in the lower").input_ids
    assert otter.decode_answers([cut_short]) == ["in the lower"], "no <|endofchunk|>: generation hit max_new_tokens"


def test_otter_decode_answers_on_continuations_only(otter):
    batch = otter(text=[build_prompt("What shape is it?"), build_prompt(QUESTION, EXAMPLES)], images=[image("red")] * 4)
    prompt_length = batch["input_ids"].shape[1]
    continuations = torch.tensor(
        [
            [*words(otter, "a diamond"), otter.endofchunk_token_id, otter.pad_token_id],
            [*words(otter, "at the top"), otter.endofchunk_token_id],
        ]
    )
    generated = torch.cat([batch["input_ids"], continuations], dim=1)
    assert otter.decode_answers(generated, prompt_length=prompt_length) == ["a diamond", "at the top"]
    assert otter.decode_answers(generated) == ["a diamond", "at the top"]
