"""`otter-serve` against a live server on 127.0.0.1 with the real `openai` client: answers equal to
`model.generate`'s, streaming, batching, OpenAI errors, disconnects, and the demo/chat `--api` clients."""

import base64
import http.server
import io
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai", reason="otter-serve's tests need the `serve` extra (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="otter-serve's tests need the `serve` extra (pip install -e '.[serve]')")

from tiny_models import TINY_OTTER_DIR  # noqa: E402

from flamingo.kernels import few_rows_linear  # noqa: E402
from otter.client import RemoteChatModel, image_url  # noqa: E402
from otter.conversation import Conversation, GenerationSettings, load_chat_model  # noqa: E402
from otter.data.shapes import draw_shape  # noqa: E402
from otter.serve import parse_args  # noqa: E402
from otter.server import ImageSource, ServerSettings, ServerThread, create_app  # noqa: E402

KEY = "test-key"
MODEL_ID = "tiny-otter"
TIMEOUT = 60


@pytest.fixture(scope="module")
def chat():
    return load_chat_model(str(TINY_OTTER_DIR))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    draw_shape("circle", "red", 32).save(folder / "circle.png")
    return folder


@pytest.fixture(scope="module")
def server(chat, image_dir):
    settings = ServerSettings(model_id=MODEL_ID, api_key=KEY, max_batch_size=8, max_new_tokens_limit=500,
                              images=ImageSource(image_dir=image_dir))
    with ServerThread(create_app(chat, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def shape(name: str = "triangle", colour: str = "yellow") -> Image.Image:
    return draw_shape(name, colour, 32)


def user(text: str, *images: Image.Image) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url(image)}} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


FEW_SHOT = [user("What colour is it?", shape("circle", "red")), {"role": "assistant", "content": "red"},
            user("What colour is it?", shape())]
FEW_SHOT_CONVERSATION = Conversation().ask("What colour is it?", [shape("circle", "red")]).answer("red").ask(
    "What colour is it?", [shape()])


def reference(chat, conversation: Conversation, max_new_tokens: int) -> str:
    """The answer of a plain greedy `model.generate` on the conversation's prompt. The server never generates
    `<image>` or `<answer>` inside an answer (see otter.serve.Scheduler), so neither does this reference."""
    processor = chat.processor
    inputs = chat.inputs(conversation)
    output = chat.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.pad_token_id,
                                 suppress_tokens=[processor.media_token_id, processor.answer_token_id])
    return processor.decode_answers(output, prompt_length=inputs["input_ids"].shape[1])[0]


def ask(client, messages=None, **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=MODEL_ID, messages=messages or [user("Hi?", shape())], **kwargs)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices), chunks


def concurrently(send, count: int) -> list:
    """`send(i)` for i in range(count), each in a thread of its own, all at once; their results in order."""
    results, errors = [None] * count, []

    def run(i: int) -> None:
        try:
            results[i] = send(i)
        except Exception as error:  # reported below, with the others
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not errors
    return results


# ---- answers ----------------------------------------------------------------------------------------
def test_answer_equals_generate_with_in_context_example(client, chat):
    response = ask(client, FEW_SHOT, max_tokens=12)
    expected = reference(chat, FEW_SHOT_CONVERSATION, 12)
    assert expected and response.choices[0].message.content == expected
    prompt_tokens = chat.inputs(FEW_SHOT_CONVERSATION)["input_ids"].shape[1]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 12)
    assert response.choices[0].finish_reason == "length"  # the untrained model never ends its chunk
    assert response.object == "chat.completion" and response.model == MODEL_ID


def test_stream_concatenates_to_answer(client):
    answer = ask(client, FEW_SHOT, max_tokens=16).choices[0].message.content
    text, chunks = streamed(ask(client, FEW_SHOT, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert text == answer
    assert sum(bool(chunk.choices and chunk.choices[0].delta.content) for chunk in chunks) > 1  # really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL_ID, "messages": [user("Hi?", shape())], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_concurrent_requests_are_batched_and_answered_alone(client, chat, server):
    questions = [f"What is shape {i}?" for i in range(8)]
    lengths = [4 + i for i in range(8)]  # rows of one batch leave at different steps
    before = health(server)
    answers = [response.choices[0].message.content for response in concurrently(
        lambda i: ask(client, [user(questions[i], shape())], max_tokens=lengths[i]), 8)]
    after = health(server)
    assert after["requests"] - before["requests"] == 8
    assert after["generate_calls"] - before["generate_calls"] < 8
    assert after["largest_batch"] > 1
    for question, length, answer in zip(questions, lengths, answers, strict=True):
        assert answer == reference(chat, Conversation().ask(question, [shape()]), length)


def test_a_worker_with_two_threads_decodes_with_few_rows_linear_and_the_same_answers(chat, monkeypatch):
    """With more than one torch thread, the decoding steps compute their products as (W @ xᵀ)ᵀ
    (flamingo/kernels.py); a batch's greedy answers stay those of `model.generate` for each request alone."""
    import flamingo.kernels as kernels

    routed = []

    def counting(x, weight, bias=None):
        routed.append(x.shape[0])
        return few_rows_linear(x, weight, bias)

    monkeypatch.setattr(kernels, "few_rows_linear", counting)
    questions = [f"Which shape is {i}?" for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the worker thread starts with it
    try:
        with ServerThread(create_app(chat, ServerSettings(model_id=MODEL_ID, api_key=KEY))) as two_threads:
            client = openai.OpenAI(base_url=f"{two_threads.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
            answers = concurrently(lambda i: ask(client, [user(questions[i], shape())], max_tokens=6), 4)
            assert health(two_threads)["largest_batch"] > 1
    finally:
        torch.set_num_threads(threads)
    assert routed and max(routed) > 1
    for question, answer in zip(questions, answers, strict=True):
        assert answer.choices[0].message.content == reference(chat, Conversation().ask(question, [shape()]), 6)


def test_requests_join_and_leave_a_running_batch_with_unchanged_answers(client, chat, server):
    """Continuous batching: requests sent while a long answer streams join its batch at the next step (they do not
    wait for it to end) and leave at their own length; every greedy answer, the long one's included (its batch
    grew and shrank around it), equals `model.generate`'s for the request alone."""
    long_tokens = 120
    before = health(server)
    stream = ask(client, FEW_SHOT, max_tokens=long_tokens, stream=True)
    first = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
    questions = ["What is it?", "Which colour is the shape on the left side?", "Is it round?"]
    answers = concurrently(lambda i: ask(client, [user(questions[i], shape("square", "blue"))], max_tokens=5 + 3 * i), 3)
    still_running = health(server)["running"]
    text = first.choices[0].delta.content + streamed(stream)[0]
    after = health(server)
    assert still_running >= 1  # the short requests ended while the long one was still generating
    assert after["largest_batch"] >= 2 and after["generate_calls"] - before["generate_calls"] <= 4
    assert text == reference(chat, FEW_SHOT_CONVERSATION, long_tokens)
    for i, question in enumerate(questions):
        expected = reference(chat, Conversation().ask(question, [shape("square", "blue")]), 5 + 3 * i)
        assert answers[i].choices[0].message.content == expected


def test_n_choices_seed_and_stop(client):
    sampled = [ask(client, n=3, temperature=1.0, seed=7, max_tokens=10) for _ in range(2)]
    contents = [[choice.message.content for choice in response.choices] for response in sampled]
    assert contents[0] == contents[1]  # the seed decides the sampled answers
    assert len(set(contents[0])) > 1 and [choice.index for choice in sampled[0].choices] == [0, 1, 2]

    answer = ask(client, max_tokens=20).choices[0].message.content
    stop = answer[6:9]
    expected = answer[: answer.find(stop)].strip()
    stopped = ask(client, max_tokens=20, stop=[stop, "never-generated"])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert streamed(ask(client, max_tokens=20, stop=stop, stream=True))[0] == expected


def test_choices_of_one_request_share_its_encoded_images(client, server):
    """The n rows of a request decode from one encoding of its images; greedy choices all equal the one answer."""
    alone = ask(client, max_tokens=6).choices[0].message.content
    before = health(server)
    response = ask(client, n=3, max_tokens=6)
    after = health(server)
    assert [choice.message.content for choice in response.choices] == [alone] * 3
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert after["decoded_rows"] - before["decoded_rows"] == 3 * (after["decode_steps"] - before["decode_steps"])
    for phase in ("image_seconds", "prompt_seconds", "decode_seconds", "row_seconds"):
        assert after[phase] > before[phase], phase


def test_models_and_health(client, server):
    (model,) = client.models.list().data
    assert model.id == MODEL_ID and model.model_extra["image_size"] == 32 and model.model_extra["trained"] is False
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert health(server)["status"] == "ok"


def test_local_image_under_image_dir(client, image_dir):
    by_path = ask(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "circle.png"}}, {"type": "text", "text": "Colour?"}]}])
    by_data = ask(client, [user("Colour?", Image.open(image_dir / "circle.png"))])
    assert by_path.choices[0].message.content == by_data.choices[0].message.content


def test_remote_images_when_allowed():
    """Fetched from a loopback HTTP server: `--allow-remote-images` downloads, and gives the same pixels."""
    png = io.BytesIO()
    shape().save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{web.server_address[1]}/shape.png"
        image = ImageSource(allow_remote=True).load(url, "the image")
        web.shutdown()
    assert image.tobytes() == shape().tobytes()


# ---- errors -----------------------------------------------------------------------------------------
def data_url(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "not an image": ({"messages": [{"role": "user", "content": [image_part(data_url(b"not a png")),
                                                                 {"type": "text", "text": "Hi"}]}]},
                     400, "messages[0].content[0] is not an image"),
    "too large": ({"messages": [{"role": "user", "content": [image_part(data_url(bytes(21 * 2**20)))]}]},
                  400, "images are limited to 20 MB"),
    "too many pixels": ({"messages": [{"role": "user", "content": [image_part(data_url(png_bytes(8193, 2)))]}]},
                        400, "8193×2 px; images are limited to 8192 px a side"),
    "more images than allowed": ({"messages": [user("Hi", *[shape()] * 9)]}, 400, "9 images; this server accepts "
                                 "at most 8"),
    "prompt longer than the context": ({"messages": [user("word " * 600, shape())]}, 400,
                                       "more than the tokenizer's model_max_length of 512"),
    "unknown parameter": ({"frobnicate": True}, 400, "Unknown parameter: 'frobnicate'."),
    "unsupported parameter": ({"tools": []}, 400, "Unknown parameter: 'tools'."),
    "bad value": ({"temperature": 5}, 400, "Invalid value for 'temperature'"),
    "remote image": ({"messages": [{"role": "user", "content": [image_part("http://127.0.0.1:9/cat.png")]}]}, 400,
                     "does not fetch images from other hosts"),
    "path outside --image-dir": ({"messages": [{"role": "user", "content": [image_part("../../etc/hostname")]}]},
                                 400, "is outside the server's --image-dir"),
    "system message": ({"messages": [{"role": "system", "content": "Be brief."}, user("Hi", shape())]}, 400,
                       "messages[0] is a system message"),
    "two user messages": ({"messages": [user("Hi", shape()), user("Hi")]}, 400,
                          "messages[1] is a user message where a assistant message was expected"),
    "image marker typed": ({"messages": [user("Look <image>", shape())]}, 400, "contains <image>"),
    "first question without image": ({"messages": [user("Hi")]}, 400, "Attach an image to your first question"),
    "ends with the answer": ({"messages": FEW_SHOT[:2]}, 400, "The last message must be a user message"),
    "max_tokens over the limit": ({"max_tokens": 501}, 400, "max_tokens is 501; this server generates at most 500"),
    "n over the batch": ({"n": 9}, 400, "n is 9; this server generates at most 8 choices"),
    "unknown model": ({"model": "gpt-4o"}, 404, "The model 'gpt-4o' does not exist"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_keeps_serving(client, case):
    body, status, message = BAD_REQUESTS[case]
    body = {"model": MODEL_ID, "messages": [user("Hi?", shape())], "max_tokens": 4, **body}
    with pytest.raises(openai.APIStatusError) as raised:  # extra_body: sent as given, unchecked by the client
        client.chat.completions.create(model=body.pop("model"), messages=body.pop("messages"), extra_body=body)
    assert raised.value.status_code == status
    assert message in raised.value.body["message"]
    assert raised.value.body["type"] in ("invalid_request_error", "server_error")
    assert ask(client, max_tokens=2).choices[0].message.content is not None  # still serving


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0, timeout=TIMEOUT)
        if not key:
            wrong = wrong.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.models.list()
        assert raised.value.status_code == 401 and "Incorrect API key" in raised.value.body["message"]


def test_full_queue_503_and_disconnect_frees_the_slot(chat):
    """One row at a time, one waiting request: a long streaming answer runs, a second request waits, a third is
    refused; closing the stream ends the long generation at its next step and the waiting request is answered."""
    settings = ServerSettings(model_id=MODEL_ID, max_batch_size=1, max_queue=1)
    with ServerThread(create_app(chat, settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        long_tokens = 490
        stream = ask(client, max_tokens=long_tokens, stream=True)
        next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)  # it is generating

        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(answer=ask(client, max_tokens=3)))
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while health(server)["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as raised:
            ask(client)
        assert raised.value.status_code == 503 and "queue is full" in raised.value.body["message"]

        stream.close()
        thread.join(TIMEOUT)
        assert waiting["answer"].choices[0].finish_reason == "length"
        counters = health(server)
        assert counters["cancelled_rows"] == 1 and counters["refused_queue_full"] == 1
        assert counters["tokens_generated"] < long_tokens  # the long row stopped early
        assert ask(client, max_tokens=2).choices[0].message.content is not None


def test_waiting_client_that_leaves_is_taken_out_of_the_queue(chat):
    settings = ServerSettings(model_id=MODEL_ID, max_batch_size=1, max_queue=2)
    with ServerThread(create_app(chat, settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        with ask(client, max_tokens=490, stream=True) as stream:
            next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
            impatient = client.with_options(timeout=1.0)
            with pytest.raises(openai.APITimeoutError):  # waits behind the long answer, gives up after 1 s
                ask(impatient, max_tokens=3)
            deadline = time.monotonic() + TIMEOUT
            while health(server)["queued"] and time.monotonic() < deadline:
                time.sleep(0.05)
            counters = health(server)
            assert counters["queued"] == 0 and counters["cancelled_rows"] == 1 and counters["running"] == 1


def test_body_larger_than_the_images_allowed_is_refused_unread(chat):
    settings = ServerSettings(model_id=MODEL_ID, max_images=1)
    with ServerThread(create_app(chat, settings)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", content=b" " * 30 * 2**20, timeout=TIMEOUT,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert "The request body is 30 MB; this server reads at most 28 MB" in response.json()["error"]["message"]


# ---- demo and chat through the server ---------------------------------------------------------------
GREEDY = GenerationSettings(max_new_tokens=10, num_beams=1, no_repeat_ngram_size=0)


def test_remote_chat_model_streams_the_in_process_answer(server, chat):
    remote = RemoteChatModel(server.url, api_key=KEY)
    assert (remote.name, remote.trained, remote.image_size) == (MODEL_ID, False, 32)
    texts = list(remote.stream(FEW_SHOT_CONVERSATION, GREEDY))
    assert texts[-1] == reference(chat, FEW_SHOT_CONVERSATION, 10)
    assert all(texts[-1].startswith(text) for text in texts)

    stop = threading.Event()
    stop.set()
    assert list(remote.stream(FEW_SHOT_CONVERSATION, GREEDY, stop)) == [""]  # stopped before any text


def test_demo_answers_through_the_server(server, chat):
    demo_module = pytest.importorskip("otter.webui", reason="the demo needs gradio")
    demo = demo_module.Demo(RemoteChatModel(server.url, api_key=KEY), GREEDY, concurrent_answers=None)
    *_, (conversation, history) = demo.respond(FEW_SHOT_CONVERSATION, [], 10, False, 1.0, 1.0, 1, 0)
    expected = reference(chat, FEW_SHOT_CONVERSATION, 10)
    assert history[-1] == {"role": "assistant", "content": expected}
    assert conversation.turns[-1].answer == expected


def test_chat_command_through_the_server(server, chat, monkeypatch, capsys):
    from otter import chat as chat_command

    lines = iter(["What colour is it?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat_command.main(["--api", server.url, "--api-key", KEY, "--max-new-tokens", "10", "--num-beams", "1",
                       "--no-repeat-ngram-size", "0"])
    expected = reference(chat, Conversation().ask("What colour is it?", [shape()]), 10)
    assert f"otter> {expected}\n" in capsys.readouterr().out


def test_command_line_checks():
    args = parse_args(["--port", "0", "--max-batch-size", "4", "--api-key", "k"])
    assert (args.max_batch_size, args.api_key, args.allow_remote_images) == (4, "k", False)
    with pytest.raises(SystemExit):
        parse_args(["--max-queue", "0"])


@pytest.mark.slow
def test_otter_serve_command_end_to_end(tmp_path):
    """The console command as a user starts it: loads the shipped tiny Otter, listens, answers, refuses a bad key."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OTTER_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "otter.serve", "--model", "tiny-otter", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "otter-serve did not start within 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
        model = client.models.list().data[0].id
        response = client.chat.completions.create(model=model, messages=[user("Hi?", shape())], max_tokens=3,
                                                  temperature=0)
        assert response.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="wrong").models.list()
    finally:
        server.terminate()
        server.wait(timeout=30)
