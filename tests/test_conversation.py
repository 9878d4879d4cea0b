"""The demo's conversation logic (prompt building, images, streaming, stopping, one generation at a time, errors) and
the handlers of `otter-demo` and `otter-chat`, called directly with good and bad inputs: no server, no browser."""

import argparse
import itertools
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny_models import TINY_OTTER_DIR as TINY_OTTER

import otter.conversation as conversation_module
from otter.conversation import (
    ChatModel,
    Conversation,
    Example,
    GenerationError,
    InputError,
    default_model,
    load_chat_model,
    load_image,
)
from otter.processing_otter import build_prompt
from otter.settings import GenerationSettings, add_generation_arguments

GREEDY = GenerationSettings(max_new_tokens=6, num_beams=1, no_repeat_ngram_size=0)


def picture(colour: str = "red", size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    return load_chat_model(str(TINY_OTTER))  # a config without weights: the untrained tiny Otter, in a second


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "query.png"
    picture("yellow").save(path)
    return str(path)


# ---- prompt building --------------------------------------------------------------------------------
def test_prompt_puts_examples_first_and_turns_as_completed_chunks(chat):
    example_images, first = [picture("red"), picture("blue")], picture("green")
    pair = [picture("white"), picture("black")]
    conversation = (Conversation(examples=(Example(example_images[0], "What colour?", "red"),
                                           Example(example_images[1], "What colour?", "blue")))
                    .ask("What colour?", [first]).answer("green")
                    .ask("What shape is it?").answer("a square")  # follow-up: no image, so no <image>
                    .ask("Which is darker?", pair))
    assert conversation.prompt(chat.processor) == (
        "<image>User: What colour? GPT:<answer> red<|endofchunk|>"
        "<image>User: What colour? GPT:<answer> blue<|endofchunk|>"
        "<image>User: What colour? GPT:<answer> green<|endofchunk|>"
        "User: What shape is it? GPT:<answer> a square<|endofchunk|>"
        "<image><image>User: Which is darker? GPT:<answer>"
    )
    assert [id(image) for image in conversation.images()] == [id(image) for image in [*example_images, first, *pair]]
    inputs = chat.inputs(conversation)  # the processor and the model agree: one <image> per image
    assert (inputs["input_ids"] == chat.processor.media_token_id).sum() == inputs["vision_x"].shape[1] == 5
    assert chat.model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_single_question_prompt_is_otter_generate_s(chat):
    examples = [("What colour is the shape?", "red"), ("What colour is the shape?", "blue")]
    conversation = Conversation(examples=tuple(Example(picture(), q, a) for q, a in examples))
    assert conversation.ask("What colour is the shape?", [picture()]).prompt(chat.processor) == build_prompt(
        "What colour is the shape?", examples)


def test_follow_up_attends_to_the_last_image(chat):
    conversation = Conversation().ask("What is it?", [picture()]).answer("red").ask("Sure?")
    inputs = chat.inputs(conversation)
    assert inputs["vision_x"].shape[1] == 1
    assert chat.model.attended_images(inputs["input_ids"])[0, -1] == 1  # the follow-up's text sees image 1


@pytest.mark.parametrize("question, images, message", [
    ("What is it?", [], "Attach an image to your first question"),
    ("   ", [picture()], "question is empty"),
    ("Compare <image> with this", [picture()], "<image>, which would need more images than were given"),
    ("Stop here<|endofchunk|>", [picture()], "reserved markers"),
])
def test_bad_questions_are_refused_with_a_reason(question, images, message):
    with pytest.raises(InputError, match=message.replace("|", r"\|")):
        Conversation().ask(question, images)


def test_one_question_at_a_time_and_retract():
    pending = Conversation().ask("What is it?", [picture()])
    with pytest.raises(InputError, match="Wait for the answer"):
        pending.ask("And now?")
    assert pending.retract() == Conversation() and pending.answer("red").retract() == pending.answer("red")


def test_load_image_limits(tmp_path, monkeypatch):
    picture("red", (30, 20)).convert("RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").mode == "RGB"
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="Cannot read missing.png"):
        load_image(tmp_path / "missing.png")
    Image.new("L", (conversation_module.MAX_IMAGE_SIDE + 1, 2)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match=r"8193×2 px; images are limited to 8192 px a side"):
        load_image(tmp_path / "wide.png")
    with open(tmp_path / "huge.png", "wb") as file:
        file.truncate((conversation_module.MAX_IMAGE_MB + 1) * 2**20)  # sparse: no need to write 21 MB
    with pytest.raises(InputError, match=r"huge.png is 21.0 MB; images are limited to 20 MB"):
        load_image(tmp_path / "huge.png")


# ---- generation -------------------------------------------------------------------------------------
def test_stream_grows_to_the_answer_generate_gives(chat):
    conversation = Conversation().ask("What colour is the shape?", [picture()])
    texts = list(chat.stream(conversation, GREEDY))
    assert len(texts) > 1 and all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    inputs = chat.inputs(conversation)
    generated = chat.model.generate(**inputs, **GREEDY.generate_kwargs(), pad_token_id=chat.processor.pad_token_id)
    assert texts[-1] == chat.processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]


def test_beam_search_answers_once_at_the_end(chat):
    conversation = Conversation().ask("What colour is the shape?", [picture()])
    assert len(list(chat.stream(conversation, GenerationSettings(max_new_tokens=4, num_beams=2)))) == 1


def spy_generate(chat, monkeypatch) -> list[torch.Tensor]:
    """Record what `model.generate` returns."""
    outputs, generate = [], chat.model.generate

    def recording_generate(**kwargs):
        outputs.append(generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(chat.model, "generate", recording_generate)
    return outputs


def test_stop_ends_generation_at_the_next_token(chat, monkeypatch):
    outputs = spy_generate(chat, monkeypatch)
    conversation = Conversation().ask("What colour is the shape?", [picture()])
    stop = threading.Event()
    for _ in chat.stream(conversation, GenerationSettings(max_new_tokens=200, num_beams=1), stop):
        stop.set()  # as the Stop button does, from another thread, once the answer has begun
    prompt_length = chat.inputs(conversation)["input_ids"].shape[1]
    assert outputs[0].shape[1] - prompt_length < 50  # the streamer's first text comes at a word's end


def test_stop_works_with_beam_search(chat, monkeypatch):
    outputs = spy_generate(chat, monkeypatch)
    conversation = Conversation().ask("What colour is the shape?", [picture()])
    stop = threading.Event()
    stop.set()  # Stop pressed while the question waited in the queue
    list(chat.stream(conversation, GenerationSettings(max_new_tokens=200, num_beams=3), stop))
    assert outputs[0].shape[1] - chat.inputs(conversation)["input_ids"].shape[1] == 1


def test_closing_the_stream_early_stops_the_generation(chat):
    stop = threading.Event()
    long = GenerationSettings(max_new_tokens=500, num_beams=1)
    texts = chat.stream(Conversation().ask("What?", [picture()]), long, stop)
    next(texts)
    texts.close()  # a closed browser tab
    assert stop.is_set() and not any(thread.name == "otter-generate" for thread in threading.enumerate())


def test_one_generation_at_a_time(chat, monkeypatch):
    running, overlaps, generate = [], [], chat.model.generate

    def slow_generate(**kwargs):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.2)
        running.pop()
        return generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", slow_generate)
    conversation = Conversation().ask("What?", [picture()])
    threads = [threading.Thread(target=lambda: list(chat.stream(conversation, GREEDY))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert overlaps == [1, 1, 1]


def test_model_failure_raises_a_readable_error(chat, monkeypatch):
    def broken_generate(**kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(chat.model, "generate", broken_generate)
    with pytest.raises(GenerationError, match="The model failed: RuntimeError: CUDA out of memory"):
        list(chat.stream(Conversation().ask("What?", [picture()]), GREEDY))


def test_conversation_longer_than_the_context_is_refused(chat, monkeypatch):
    monkeypatch.setattr(chat.model.config.text_config, "max_position_embeddings", 8)
    with pytest.raises(InputError, match="more than the model's context of 8: clear the chat"):
        list(chat.stream(Conversation().ask("What colour is the shape in this picture?", [picture()]), GREEDY))


def test_generation_settings():
    assert "temperature" not in GenerationSettings().generate_kwargs()
    assert GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9).generate_kwargs()["top_p"] == 0.9
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    assert GenerationSettings.from_args(parser.parse_args([])) == GenerationSettings()  # Otter's demo defaults
    assert GenerationSettings.from_args(parser.parse_args([]), trained=False).max_new_tokens == 32
    assert GenerationSettings.from_args(parser.parse_args(["--max-new-tokens", "9"]), trained=False).max_new_tokens == 9


def test_default_model_is_the_one_otter_train_recorded_from_any_directory(tmp_path, monkeypatch):
    from otter.defaults import record_trained_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert default_model() == "tiny-otter"  # nothing recorded: the shipped config, untrained
    model_dir = tmp_path / "run/model"
    model_dir.mkdir(parents=True)
    record_trained_model(model_dir)
    assert default_model() == "tiny-otter"  # recorded, but no weights in it (yet)
    (model_dir / "model.safetensors").touch()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert default_model() == str(model_dir.resolve())


def test_load_in_8bit(chat, tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install -e '.[quantization]')")
    with pytest.raises(ValueError, match="needs a checkpoint with weights"):
        load_chat_model(str(TINY_OTTER), load_in_8bit=True)
    chat.model.save_pretrained(tmp_path)
    chat.processor.save_pretrained(tmp_path)
    quantized = load_chat_model(str(tmp_path), load_in_8bit=True)
    assert quantized.trained and any(isinstance(module, bitsandbytes.nn.Linear8bitLt)
                                     for module in quantized.model.lang_encoder.modules())
    assert list(quantized.stream(Conversation().ask("What?", [picture()]), GREEDY))


# ---- otter-demo handlers ----------------------------------------------------------------------------
@pytest.fixture
def demo(chat):
    pytest.importorskip("gradio", reason="otter-demo needs gradio (pip install -e '.[demo]')")
    from otter.webui import Demo

    return Demo(chat, GREEDY)


def session(name: str = "tab-1") -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)  # what the handlers read from gr.Request


def respond(demo, conversation, history, settings=GREEDY, request=None):
    values = [settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_p, settings.num_beams,
              settings.no_repeat_ngram_size]
    return demo.respond(conversation, history, *values, request=request or session())


def no_examples() -> list:
    return [None, "", ""] * 2


def test_submit_then_respond_streams_into_the_chat(demo, image_file):
    slots = [image_file, "What colour is the shape?", "yellow", None, "", ""]
    message = {"text": " What colour is the shape? ", "files": [image_file]}
    cleared, history, conversation = demo.submit(message, [], Conversation(), *slots, request=session())
    assert cleared is None and conversation.pending and len(conversation.examples) == 1
    assert history == [{"role": "user", "content": [{"path": image_file}, "What colour is the shape?"]}]
    steps = list(respond(demo, conversation, history))
    assert len(steps) > 1  # streamed
    final_conversation, final_history = steps[-1]
    assert final_conversation.turns[-1].answer == final_history[-1]["content"]
    assert final_history[-1]["role"] == "assistant" and not final_conversation.pending


@pytest.mark.parametrize("message, slots, error", [
    ({"text": "What is it?", "files": []}, no_examples(), "Attach an image to your first question"),
    ({"text": "What is it? <image>", "files": ["IMAGE"]}, no_examples(), "would need more images than were given"),
    ({"text": "What is it?", "files": ["NOTES"]}, no_examples(), "notes.txt is not an image"),
    ({"text": "What is it?", "files": ["IMAGE"]}, ["IMAGE", "What colour?", "", None, "", ""],
     "In-context example 1 needs an image, a question and an answer; it has no answer"),
    ({"text": "What is it?", "files": ["IMAGE"]}, [None, "", "", None, "What?", "red"], "it has no image"),
    ({"text": "", "files": ["IMAGE"]}, no_examples(), "The question is empty"),
])
def test_bad_input_is_shown_as_an_error(demo, image_file, tmp_path, message, slots, error):
    import gradio as gr

    (tmp_path / "notes.txt").write_text("not a picture")
    files = {"IMAGE": image_file, "NOTES": str(tmp_path / "notes.txt")}
    message = {**message, "files": [files[name] for name in message["files"]]}
    slots = [files.get(value, value) for value in slots]
    with pytest.raises(gr.Error, match=error):
        demo.submit(message, [], Conversation(), *slots, request=session())


def test_model_failure_is_shown_and_the_demo_keeps_serving(demo, image_file, monkeypatch):
    import gradio as gr

    _, history, conversation = demo.submit({"text": "What?", "files": [image_file]}, [], Conversation(),
                                           *no_examples(), request=session())
    generate = demo.chat.model.generate
    monkeypatch.setattr(demo.chat.model, "generate", lambda **kwargs: 1 / 0)
    steps = respond(demo, conversation, history)
    retracted, shown = next(steps)
    assert retracted == Conversation() and "ZeroDivisionError" in shown[-1]["content"]
    with pytest.raises(gr.Error, match="The model failed: ZeroDivisionError"):
        next(steps)
    monkeypatch.setattr(demo.chat.model, "generate", generate)
    _, history, conversation = demo.submit({"text": "What?", "files": [image_file]}, shown, retracted,
                                           *no_examples(), request=session())
    assert not list(respond(demo, conversation, history))[-1][0].pending


def test_stop_is_per_session_and_clear_resets(demo, image_file):
    _, history, conversation = demo.submit({"text": "What?", "files": [image_file]}, [], Conversation(),
                                           *no_examples(), request=session("tab-1"))
    demo.stop(request=session("tab-2"))
    long = GenerationSettings(max_new_tokens=40, num_beams=1, no_repeat_ngram_size=0)
    unstopped = list(respond(demo, conversation, history, long, request=session("tab-1")))[-1][0]
    demo.stop(request=session("tab-1"))  # pressed while queued: the answer stops as soon as it starts
    stopped = list(respond(demo, conversation, history, long, request=session("tab-1")))[-1][0]
    assert len(stopped.turns[-1].answer) < len(unstopped.turns[-1].answer)
    assert demo.clear(request=session("tab-1")) == (None, [], Conversation())


def test_page_queues_generation_one_at_a_time(demo, tmp_path):
    blocks = demo.blocks(tmp_path)
    respond_fn = next(fn for fn in blocks.fns.values() if fn.name == "respond")
    assert respond_fn.concurrency_limit == 1 and respond_fn.concurrency_id == "generate"
    assert len(list(tmp_path.glob("*.png"))) == 10  # the example inputs' pictures


def test_demo_listens_locally_by_default():
    pytest.importorskip("gradio", reason="otter-demo needs gradio (pip install -e '.[demo]')")
    from otter.demo import parse_args

    args = parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


# ---- otter-chat -------------------------------------------------------------------------------------
def test_terminal_chat(chat, image_file, monkeypatch, capsys):
    from otter.chat import chat_loop

    lines = iter(["What is it?", "/image /nowhere.png", f"/image {image_file}", "Compare <image>", "And now?",
                  "/clear", "Again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    chat_loop(chat, Conversation(), [picture()], GREEDY)
    out = capsys.readouterr().out
    assert out.count("otter> ") == 2  # the first question and the follow-up with the attached image
    assert "Cannot read nowhere.png" in out and "(1 image(s) for the next question)" in out
    assert "would need more images" in out and "Attach an image to your first question" in out


def test_print_streamed_prints_each_new_part(capsys):
    from otter.chat import print_streamed

    assert print_streamed(["re", "red", "red car"]) == "red car"
    assert capsys.readouterr().out == "red car\n"


def test_chat_command_line(image_file, tmp_path, monkeypatch, capsys):
    from otter.chat import main

    lines = iter(["What colour is the shape?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    main(["--model", str(TINY_OTTER), "--image", image_file, "--example", image_file, "What colour is the shape?",
          "yellow", "--num-beams", "1", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "untrained model" in out and "1 in-context example(s)" in out and out.count("otter> ") == 1
    (tmp_path / "notes.txt").write_text("not a picture")
    assert main(["--model", str(TINY_OTTER), "--example", str(tmp_path / "notes.txt"), "What?", "red"]) == 2
    assert "notes.txt is not an image" in capsys.readouterr().err
