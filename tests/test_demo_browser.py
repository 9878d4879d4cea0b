"""`otter-demo` end to end: start the server, then drive headless Chromium in two tabs at once: an error shown in
the page, an uploaded image with a typed question, an example input with in-context examples, answers appearing,
no request leaving the machine. Saves a screenshot.

Needs Debian's `chromium` (`apt-get install chromium`) and `pip install playwright gradio`; Playwright's own
browser download (`playwright install`) is not used. Environment knobs, for making the README screenshot:
OTTER_DEMO_MODEL (default: the untrained tiny Otter, fast) and OTTER_DEMO_SCREENSHOT (default: in tmp_path).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tiny_models import TINY_OTTER_DIR as TINY_OTTER

from otter.data.shapes import draw_shape

pytest.importorskip("gradio", reason="otter-demo needs gradio (pip install -e '.[demo]')")
playwright = pytest.importorskip("playwright.sync_api", reason="needs Playwright's client (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S, ANSWER_S = 120, 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo on a free local port, answering in at most 8 greedy tokens so that they stream."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    model = os.environ.get("OTTER_DEMO_MODEL", str(TINY_OTTER))
    command = [sys.executable, "-m", "otter.demo", "--model", model, "--port", str(port),
               "--num-beams", "1", "--max-new-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"otter-demo exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"otter-demo did not serve {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def leaves_machine(url: str) -> bool:
    """A network request to another host (data: and blob: URLs stay in the page)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in ("127.0.0.1", "localhost")


def test_chat_in_two_tabs(server, tmp_path):
    expect = playwright.expect
    image = tmp_path / "triangle.png"
    draw_shape("triangle", "yellow", 224).save(image)
    screenshot = Path(os.environ.get("OTTER_DEMO_SCREENSHOT", tmp_path / "demo.png"))
    outside = []  # requests to anything but the demo server: there must be none (offline, no tracking)

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        context = browser.new_context(viewport={"width": 1280, "height": 1160})
        context.set_default_timeout(30_000)
        context.on("request", lambda request: outside.append(request.url) if leaves_machine(request.url) else None)
        upload_tab, example_tab = context.new_page(), context.new_page()
        for page in (upload_tab, example_tab):
            page.goto(server)
            if "OTTER_DEMO_MODEL" not in os.environ:
                expect(page.locator("#untrained")).to_contain_text("Untrained model")

        # A question without an image: the page says why it cannot be answered, and nothing is added to the chat.
        question = upload_tab.locator("#message textarea")
        question.fill("What colour is the shape?")
        question.press("Enter")
        expect(upload_tab.get_by_text("Attach an image to your first question").first).to_be_visible()
        expect(upload_tab.locator("#chatbot [data-testid='user']")).to_have_count(0)

        # Tab 1 uploads an image; tab 2 clicks the first example input (query, question and two in-context examples).
        upload_tab.locator("#message input[type=file]").set_input_files(image)
        expect(upload_tab.locator("#message img").first).to_be_visible()
        question.fill("What colour is the shape?")
        example_tab.locator("table tbody tr").first.click()
        expect(example_tab.locator("#message img").first).to_be_visible()
        expect(example_tab.get_by_label("Answer 2")).to_have_value("blue")

        # Both ask at once: the queue answers them one after the other.
        question.press("Enter")
        example_tab.locator("#message textarea").press("Enter")
        for page in (upload_tab, example_tab):
            expect(page.locator("#chatbot [data-testid='user'] img").first).to_be_visible()
            expect(page.locator("#chatbot [data-testid='bot']").first).not_to_be_empty(timeout=ANSWER_S * 1000)
            expect(page.locator("#message textarea")).to_have_value("")

        # A follow-up without an image: about the last image, answered below the first answer.
        example_tab.locator("#message textarea").fill("What shape is it?")
        example_tab.locator("#message textarea").press("Enter")
        expect(example_tab.locator("#chatbot [data-testid='bot']").nth(1)).not_to_be_empty(timeout=ANSWER_S * 1000)
        expect(example_tab.locator("#chatbot [data-testid='user'] img")).to_have_count(1)
        example_tab.evaluate("window.scrollTo(0, 0)")  # clicking the example scrolled down to it
        example_tab.wait_for_timeout(500)  # let the last streamed token render before the picture is taken
        example_tab.screenshot(path=screenshot)
        browser.close()
    assert screenshot.stat().st_size > 10_000
    assert outside == []
