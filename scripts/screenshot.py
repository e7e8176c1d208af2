"""Make the README's screenshot (docs/screenshot.png) of Parley on its real default.

Starts ``parley serve`` as ``make serve`` would with no configuration (SQLite and the
embedded SmolLM2-135M-Instruct model, in a temporary data directory, on a free port),
chats with it in Debian's Chromium (headless, through Playwright; no browser is ever
downloaded), and saves the page once the usage panel shows the chats' figures.

    .venv/bin/python scripts/screenshot.py [--out docs/screenshot.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PARLEY = Path(sys.executable).with_name("parley")
CHROMIUM = "/usr/bin/chromium"
NAME = "Ada"
# Short, real questions; the second asks for code, so a highlighted block may show.
MESSAGES = [
    "Hi! What is the capital of France?",
    "Show me a short Python function that reverses a string, in a code block.",
]
# What the usage panel shows before it has figures: an en dash.
NO_FIGURE = "\u2013"
# The embedded model on a busy machine can take a minute or more per reply.
REPLY_TIMEOUT_MS = 300_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_environment(data_dir: Path) -> dict[str, str]:
    """This environment without any of Parley's settings: the defaults, in ``data_dir``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PARLEY_", "OPENAI_")) and name != "DATABASE_URL"
    }
    env["PARLEY_DATA_DIR"] = str(data_dir)
    return env


@contextmanager
def parley_server(data_dir: Path, timeout: float = 180) -> Iterator[str]:
    """``parley serve`` on the default set-up; yields its URL, stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir.parent / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(PARLEY), "serve", "--port", str(port)],
            env=default_environment(data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"parley exited at start:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/times", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"parley did not become ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def chat(page: Page, url: str) -> str:
    """Through the name prompt, then each message and its complete reply; returns the
    model picker's choice."""
    page.goto(url)
    page.get_by_label("Your name").fill(NAME)
    page.get_by_role("button", name="Start chatting").click()
    expect(page.locator("#who")).to_have_text(NAME)
    # The model picker shows the embedded model's name.
    expect(page.locator("#model")).to_be_visible()
    replies = page.locator(".message.assistant")
    for number, text in enumerate(MESSAGES):
        page.get_by_role("textbox", name="Message").fill(text)
        page.keyboard.press("Enter")
        reply = replies.nth(number)
        expect(reply).to_be_attached()
        expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_TIMEOUT_MS)
        expect(page.get_by_role("button", name="Send")).to_be_visible()
        expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    return page.locator("#model").input_value()


def wait_for_usage(page: Page) -> None:
    """The usage panel with the chats' figures, and the embedded model's compute apart."""
    for figure in ("#cpu-time", "#wall-time", "#cost-cpu", "#cost-duration"):
        expect(page.locator(figure)).not_to_have_text(NO_FIGURE)
    expect(page.locator("#wall-time")).not_to_have_text("0.000 s", timeout=10_000)
    expect(page.locator("#model-cpu")).to_be_visible()
    expect(page.locator("#model-cpu-time")).not_to_have_text(NO_FIGURE)
    # One more refresh (every second), so the chart has the last reply's bucket too.
    page.wait_for_timeout(2_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="parley-screenshot-") as tmp,
        parley_server(Path(tmp) / "data") as url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                viewport={"width": args.width, "height": args.height}, color_scheme="light"
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            model = chat(page, url)
            wait_for_usage(page)
            # Taller than asked when the usage panel needs it, so none of it is cut off.
            height = max(args.height, page.locator(".usage").evaluate("u => u.scrollHeight"))
            if height > args.height:
                page.set_viewport_size({"width": args.width, "height": height})
                page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
        finally:
            browser.close()
    print(f"wrote {args.out} ({args.width}x{height}, model {model})")


if __name__ == "__main__":
    main()
