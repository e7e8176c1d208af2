"""The page, driven in Debian's Chromium (headless) by Playwright.

The browser is the system's ``chromium``; Playwright never downloads one. Screenshots of
the main screen go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.api_client import as_user, new_conversation, send, stream
from tests.conftest import AUTH_MODES, ParleyServer, serve_in_mode, unique
from tests.fake_provider import FakeProvider, reply_for, take_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SLOW = "[slow:0.1] " + " ".join(f"word{i}" for i in range(40))


class Watched:
    """A page, with what it did that it must not: dialogs, errors, requests elsewhere."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.foreign_requests: list[str] = []
        host = urlsplit(base_url).netloc
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "request",
            lambda request: (
                None
                if urlsplit(request.url).netloc == host
                else self.foreign_requests.append(request.url)
            ),
        )
        self.accept_dialogs = False

    def _dialog(self, dialog: object) -> None:
        self.dialogs.append(dialog.message)  # type: ignore[attr-defined]
        if self.accept_dialogs:
            dialog.accept()  # type: ignore[attr-defined]
        else:
            dialog.dismiss()  # type: ignore[attr-defined]


@pytest.fixture
def watched(browser: Browser, server: ParleyServer) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield Watched(page, server.url)
    context.close()


@pytest.fixture(scope="module", params=AUTH_MODES)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[ParleyServer]:
    """The page's server, in open mode (a name) and in accounts mode (a password)."""
    yield from serve_in_mode(request.param, tmp_path_factory, provider)


def sign_in(page: Page, server: ParleyServer, name: str | None = None) -> str:
    """Through the name prompt (open mode) or by creating an account (accounts mode)."""
    name = name or unique("sailor")
    page.goto(server.url)
    expect(page.get_by_label("Your name")).to_be_visible()
    page.get_by_label("Your name").fill(name)
    if server.env.get("PARLEY_AUTH") == "accounts":
        expect(page.get_by_label("Password")).to_be_visible()
        page.get_by_label("Password").fill("a long enough secret")
        page.get_by_role("button", name="Create an account").click()
    else:
        page.get_by_role("button", name="Start chatting").click()
    expect(page.locator("#who")).to_have_text(name)
    return name


def say(page: Page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.keyboard.press("Enter")


def reply(page: Page, number: int) -> Locator:
    """The page's ``number``-th reply (from 1), once it is on the page."""
    replies = page.locator(".message.assistant")
    expect(replies.nth(number - 1)).to_be_attached()
    return replies.nth(number - 1)


# --- Chatting ------------------------------------------------------------------------


def test_the_name_prompt_then_a_reply_that_streams_in(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    name = sign_in(page, server)
    say(page, SLOW)
    first = reply(page, 1)
    # Part of the reply is on the page while the rest is still being written.
    expect(first).to_have_attribute("data-status", "streaming")
    expect(first.locator(".content")).to_contain_text("Arr!")
    assert "word39" not in first.inner_text()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(first).to_have_attribute("data-status", "complete", timeout=20_000)
    expect(first.locator(".content")).to_have_text(reply_for(SLOW))
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    # The conversation is in the URL and in the sidebar, named after the first message.
    assert "?c=" in page.url
    expect(page.locator(".conversation-item .open")).to_have_count(1)
    # The name is remembered.
    page.reload()
    expect(page.locator("#who")).to_have_text(name)
    expect(page.locator(".message.assistant .content")).to_have_text(reply_for(SLOW))
    assert watched.errors == []


def test_a_reload_mid_reply_shows_what_was_written_and_keeps_streaming(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    sign_in(page, server)
    say(page, SLOW)
    expect(reply(page, 1).locator(".content")).to_contain_text("word3")
    page.reload()
    again = reply(page, 1)
    expect(again.locator(".content")).to_contain_text("word3", timeout=3_000)
    expect(again).to_have_attribute("data-status", "streaming")
    expect(again).to_have_attribute("data-status", "complete", timeout=20_000)
    expect(again.locator(".content")).to_have_text(reply_for(SLOW))


def test_stop_keeps_the_partial_reply(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    say(page, SLOW)
    stopped = reply(page, 1)
    expect(stopped.locator(".content")).to_contain_text("word2")
    page.keyboard.press("Escape")
    expect(stopped).to_have_attribute("data-status", "stopped")
    expect(stopped).to_contain_text("Stopped.")
    shown = stopped.locator(".content").inner_text()
    assert "word2" in shown and "word39" not in shown
    page.reload()
    expect(reply(page, 1).locator(".content")).to_have_text(shown)


def test_shift_enter_is_a_new_line_and_enter_sends(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    box = page.get_by_role("textbox", name="Message")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    box.press("Enter")
    expect(page.locator(".message.user .content")).to_have_text("first line\nsecond line")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")


# --- Conversations -------------------------------------------------------------------


def test_conversations_are_created_switched_renamed_and_deleted(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    sign_in(page, server)
    say(page, "Charts of Tortuga")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    first_url = page.url
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    say(page, "Rum rations")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    items = page.locator(".conversation-item .open")
    expect(items).to_have_text(["Rum rations", "Charts of Tortuga"])

    items.filter(has_text="Charts of Tortuga").click()
    expect(page.locator(".message.user .content")).to_have_text(["Charts of Tortuga"])
    assert page.url == first_url
    page.go_back()
    expect(page.locator(".message.user .content")).to_have_text(["Rum rations"])

    page.get_by_role("button", name="Rename Rum rations").click()
    page.get_by_label("New name").fill("Provisions")
    page.get_by_label("New name").press("Enter")
    expect(items).to_have_text(["Provisions", "Charts of Tortuga"])
    expect(page.locator("#title")).to_have_text("Provisions")

    # Declining the confirmation keeps it; accepting deletes it.
    page.get_by_role("button", name="Delete Provisions").click()
    expect(items).to_have_count(2)
    watched.accept_dialogs = True
    page.get_by_role("button", name="Delete Provisions").click()
    expect(items).to_have_text(["Charts of Tortuga"])
    expect(page.locator(".message")).to_have_count(0)
    assert len(watched.dialogs) == 2
    page.reload()
    expect(items).to_have_text(["Charts of Tortuga"])


def test_a_returning_user_lands_on_the_latest_conversation(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    sign_in(page, server)
    expect(page.locator("#empty")).to_be_visible()  # nothing yet to land on
    say(page, "Charts of Tortuga")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    say(page, "Rum rations")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    latest = page.url
    page.goto(server.url)  # no ?c=: the latest one opens, and the URL says which
    expect(page.locator(".message.user .content")).to_have_text(["Rum rations"])
    expect(page.locator('.conversation-item .open[aria-current="page"]')).to_have_text(
        "Rum rations"
    )
    assert page.url == latest
    assert watched.errors == []


def test_scrolling_back_loads_older_messages_and_conversations(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    """More messages and conversations than a page of each: the older ones load as the
    page is scrolled, each once, in order, and what was on screen stays where it was."""
    busy = make_server().start()
    name = unique("logkeeper")
    texts = [f"entry {i}" for i in range(60)]
    with as_user(busy.client(), name) as http:
        for _ in range(69):
            new_conversation(http)
        long = new_conversation(http)
        for text in texts:
            assert [event.event for event in stream(http, send(http, long, text))][-1] == "done"
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    watched = Watched(page, busy.url)
    try:
        sign_in(page, busy, name)
        # The latest conversation opens at its last page of 50 messages.
        expect(page).to_have_url(re.compile(rf"\?c={long}$"))
        messages = page.locator("#messages .message")
        expect(messages).to_have_count(50)
        expect(messages.last.locator(".content")).to_have_text(reply_for("entry 59"))
        view = page.locator("#conversation")
        for count in (100, 120):
            top = messages.first.get_attribute("data-id")
            # Scrolled to the top: where the topmost message was when the scroll began.
            was = view.evaluate(
                "view => { view.scrollTop = 0;"
                " return view.querySelector('.message').getBoundingClientRect().top; }"
            )
            expect(messages).to_have_count(count)
            now = page.locator(f'#messages .message[data-id="{top}"]').bounding_box()
            assert now is not None and abs(now["y"] - was) < 2
        assert page.locator(".message.user .content").all_inner_texts() == texts
        ids = messages.evaluate_all("items => items.map(item => item.dataset.id)")
        assert len(set(ids)) == 120
        page.wait_for_timeout(300)
        expect(messages).to_have_count(120)  # nothing more asked for, nothing repeated

        conversations = page.locator(".conversation-item")
        expect(conversations).to_have_count(50)
        page.locator("#conversation-list").evaluate(
            "list => { list.scrollTop = list.scrollHeight; }"
        )
        expect(conversations).to_have_count(70)
        ids = conversations.evaluate_all("items => items.map(item => item.dataset.id)")
        assert len(set(ids)) == 70 and ids[0] == long
        assert watched.errors == []
    finally:
        context.close()


# --- Copying and code ----------------------------------------------------------------


def clipboard(page: Page) -> str:
    return page.evaluate("navigator.clipboard.readText()")


def test_every_message_has_a_copy_button(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    sign_in(page, server)
    text = "Copy this *exactly*, matey:\n\n- one\n- two"
    say(page, text)
    answer = reply(page, 1)
    expect(answer).to_have_attribute("data-status", "complete")
    copy = answer.get_by_role("button", name="Copy message")
    copy.click()
    expect(copy).to_have_text("Copied")  # "Copy failed" when the clipboard refused it
    assert clipboard(page) == reply_for(text)  # the Markdown, as written
    mine = page.locator(".message.user").get_by_role("button", name="Copy message")
    mine.click()
    expect(mine).to_have_text("Copied")
    assert clipboard(page) == text


CODE = 'def greet(name):\n    return "<b>" + name  # <script>window.__xss=4</script>\n'


def test_code_blocks_are_highlighted_and_copied(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    sign_in(page, server)
    say(page, f"Some code:\n\n```python\n{CODE}```")
    answer = reply(page, 1)
    expect(answer).to_have_attribute("data-status", "complete")
    code = answer.locator("pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code.locator("span.hljs-keyword").first).to_have_text("def")
    expect(code.locator("span.hljs-string")).to_have_text(['"<b>"'])
    expect(code.locator("span.hljs-comment")).to_contain_text("<script>")
    # Highlighting changes the colours, never the text, and makes no markup of it.
    assert code.text_content() == CODE
    for tag in ("b", "script"):
        expect(page.locator(f"#messages {tag}")).to_have_count(0)
    answer.get_by_role("button", name="Copy code").click()
    expect(answer.get_by_role("button", name="Copy code")).to_have_text("Copied")
    assert clipboard(page) == CODE
    assert page.evaluate("window.__xss") is None
    assert watched.errors == [] and watched.foreign_requests == []


# --- Versions, models and instructions -----------------------------------------------


def test_regenerate_makes_a_second_version_and_the_switcher_shows_either(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    sign_in(page, server)
    text = unique("[slow:0.05] a tale") + " " + " ".join(f"word{i}" for i in range(30))
    say(page, text)
    first = reply(page, 1)
    expect(first.locator(".content")).to_contain_text("word2")
    page.keyboard.press("Escape")
    expect(first).to_have_attribute("data-status", "stopped")
    partial = first.locator(".content").inner_text()
    assert "word29" not in partial
    expect(first.locator(".version")).to_have_count(0)

    first.get_by_role("button", name="Regenerate").click()
    again = reply(page, 1)  # the branch still has one reply: the new version
    expect(again).to_have_attribute("data-status", "streaming")
    expect(again.get_by_role("button", name="Regenerate")).to_have_count(0)
    expect(again).to_have_attribute("data-status", "complete", timeout=20_000)
    expect(again.locator(".content")).to_have_text(reply_for(text))
    expect(again.locator(".version")).to_have_text("2/2")
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(again.get_by_role("button", name="Next version")).to_be_disabled()

    again.get_by_role("button", name="Previous version").click()
    older = reply(page, 1)
    expect(older.locator(".version")).to_have_text("1/2")
    expect(older.locator(".content")).to_have_text(partial)
    expect(older).to_contain_text("Stopped.")
    expect(older.get_by_role("button", name="Previous version")).to_be_disabled()
    older.get_by_role("button", name="Next version").click()
    expect(reply(page, 1).locator(".version")).to_have_text("2/2")
    expect(reply(page, 1).locator(".content")).to_have_text(reply_for(text))

    # The version shown is the conversation's current branch: a reload keeps it.
    reply(page, 1).get_by_role("button", name="Previous version").click()
    expect(reply(page, 1).locator(".version")).to_have_text("1/2")
    page.reload()
    expect(reply(page, 1).locator(".version")).to_have_text("1/2")
    expect(reply(page, 1).locator(".content")).to_have_text(partial)
    assert watched.errors == []


def test_editing_a_message_makes_a_new_version_and_the_model_sees_that_branch(
    watched: Watched, server: ParleyServer, provider: FakeProvider
) -> None:
    page = watched.page
    sign_in(page, server)
    ann = unique("My name is Ann")
    say(page, ann)
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    mine = page.locator(".message.user").first
    mine.get_by_role("button", name="Edit").click()
    box = mine.get_by_role("textbox", name="Edit your message")
    expect(box).to_have_value(ann)
    box.fill("never sent")
    mine.get_by_role("button", name="Cancel").click()  # Cancel leaves it as it was
    expect(box).to_have_count(0)
    expect(mine.locator(".content")).to_have_text(ann)

    bob = unique("My name is Bob")
    mine.get_by_role("button", name="Edit").click()
    box.fill(bob)
    mine.get_by_role("button", name="Save").click()
    expect(page.locator(".message.user .content")).to_have_text([bob])
    expect(mine.locator(".version")).to_have_text("2/2")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    expect(reply(page, 1).locator(".content")).to_have_text(reply_for(bob))
    expect(page.locator(".message")).to_have_count(2)

    mine.get_by_role("button", name="Previous version").click()
    expect(mine.locator(".version")).to_have_text("1/2")
    expect(page.locator(".message.user .content")).to_have_text([ann])
    expect(reply(page, 1).locator(".content")).to_have_text(reply_for(ann))
    mine.get_by_role("button", name="Next version").click()
    expect(page.locator(".message.user .content")).to_have_text([bob])

    # The model is sent the branch on screen, and nothing of the other one.
    ask = unique("What is my name?")
    say(page, ask)
    expect(reply(page, 2)).to_have_attribute("data-status", "complete")
    assert provider.remembered(ask) == [bob, reply_for(bob)]
    assert watched.errors == []


def test_the_model_picker_changes_the_model_that_answers(
    browser: Browser, make_server: Callable[..., ParleyServer], provider: FakeProvider
) -> None:
    models = [{"name": "fast", "base_url": provider.base_url, "api_key": "k", "model": "fake-fast"}]
    picky = make_server(PARLEY_MODELS=json.dumps(models)).start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    watched = Watched(page, picky.url)

    def pick(value: str) -> None:
        with page.expect_response(lambda r: r.request.method == "PATCH") as patched:
            picker.select_option(value)
        assert patched.value.ok

    try:
        sign_in(page, picky)
        picker = page.get_by_label("Model", exact=True)
        expect(picker).to_be_enabled()
        expect(picker.locator("option")).to_have_count(2)
        values = picker.locator("option").evaluate_all("options => options.map(o => o.value)")
        default = values[0]
        assert values == [default, "fast"] and default != "fast"
        expect(picker).to_have_value(default)
        expect(picker.locator("option").first).to_contain_text("(default)")

        pick("fast")  # a new user's first choice makes the conversation
        expect(page).to_have_url(re.compile(r"\?c="))
        text = unique("which model answers?")
        say(page, text)
        expect(reply(page, 1)).to_have_attribute("data-status", "complete")
        assert [call.body["model"] for call in provider.calls_for(text)] == ["fake-fast"]

        page.reload()
        expect(page.get_by_label("Model", exact=True)).to_have_value("fast")
        pick(default)
        again = unique("and now?")
        say(page, again)
        expect(reply(page, 2)).to_have_attribute("data-status", "complete")
        assert [call.body["model"] for call in provider.calls_for(again)] != ["fake-fast"]
        assert watched.errors == []
    finally:
        context.close()


def test_instructions_of_a_conversation_reach_the_model(
    watched: Watched, server: ParleyServer, provider: FakeProvider
) -> None:
    page = watched.page
    sign_in(page, server)
    # One model: shown, so the user sees which answers, but nothing to pick.
    expect(page.get_by_label("Model", exact=True)).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_be_disabled()
    toggle = page.get_by_role("button", name="Instructions", exact=True)
    box = page.get_by_label("Instructions for this conversation")
    toggle.click()
    expect(box).to_have_value("")
    prompt = unique("Answer as a parrot would")
    box.fill(prompt)
    page.get_by_role("button", name="Save instructions").click()
    expect(box).to_be_hidden()
    expect(toggle).to_have_class(re.compile(r"\bcustom\b"))
    text = unique("who is speaking?")
    say(page, text)
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    (call,) = provider.calls_for(text)
    assert call.messages[0] == {"role": "system", "content": prompt}

    page.reload()
    toggle.click()
    expect(box).to_have_value(prompt)
    box.fill("x" * 16_001)  # over the server's limit: refused, said, and nothing changed
    page.get_by_role("button", name="Save instructions").click()
    expect(page.locator("#notice")).to_be_visible()
    expect(box).to_be_visible()
    page.get_by_role("button", name="Reset to default").click()
    expect(box).to_be_hidden()
    expect(toggle).not_to_have_class(re.compile(r"\bcustom\b"))
    again = unique("and who now?")
    say(page, again)
    expect(reply(page, 2)).to_have_attribute("data-status", "complete")
    (call,) = provider.calls_for(again)
    assert call.messages[0]["role"] == "system" and call.messages[0]["content"] != prompt
    assert watched.errors == []


# --- Safety --------------------------------------------------------------------------


XSS = (
    '<img src=x onerror="window.__xss=1;alert(1)"> <script>window.__xss=2</script> '
    "[click](javascript:window.__xss=3) ![pic](http://example.invalid/pic.png) "
    "<iframe src=http://example.invalid></iframe> <a href=http://example.invalid>x</a>"
)


def test_html_in_messages_and_replies_stays_inert(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    say(page, XSS)
    echo = reply(page, 1)
    expect(echo).to_have_attribute("data-status", "complete")
    # Raw HTML shows as the text it is, in the user's message and in the model's echo.
    expect(page.locator(".message.user .content")).to_have_text(XSS)
    expect(echo.locator(".content")).to_contain_text("<img src=x onerror=")
    expect(echo.locator(".content")).to_contain_text("<script>window.__xss=2</script>")
    messages = page.locator("#messages")
    for tag in ("img", "script", "iframe"):
        expect(messages.locator(tag)).to_have_count(0)
    for link in messages.locator("a").all():
        assert not (link.get_attribute("href") or "").startswith("javascript:")
    messages.get_by_text("click", exact=True).click()
    page.reload()
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert watched.dialogs == []
    assert watched.foreign_requests == []


# --- Errors --------------------------------------------------------------------------


def test_a_failed_reply_says_why_and_retry_works(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    text = unique("[fail-once:400] doomed at first")
    say(page, text)
    failed = reply(page, 1)
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.get_by_role("alert")).to_contain_text("HTTP 400")
    failed.get_by_role("button", name="Retry").click()
    expect(reply(page, 2)).to_have_attribute("data-status", "complete")
    expect(reply(page, 2).locator(".content")).to_have_text(reply_for(text))


def test_a_send_that_fails_keeps_the_text(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    page.route("**/messages", lambda route: route.abort())
    say(page, "do not lose me")
    expect(page.locator("#notice")).to_contain_text("could not be reached")
    assert page.get_by_role("textbox", name="Message").input_value() == "do not lose me"
    expect(page.locator(".message")).to_have_count(0)
    page.unroute("**/messages")
    page.locator("#notice").get_by_role("button", name="Retry").click()
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    expect(page.locator(".message.user .content")).to_have_text(["do not lose me"])


# --- Usage panel and screenshots -----------------------------------------------------


def test_the_usage_panel_updates(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    say(page, "[slow:0.05] count the doubloons one by one")
    expect(reply(page, 1)).to_have_attribute("data-status", "complete")
    expect(page.locator("#wall-time")).not_to_have_text("0.000 s", timeout=5_000)
    expect(page.locator("#cpu-time")).to_have_text(lambda_seconds())
    expect(page.locator("#usage-chart polyline")).to_have_count(2)
    expect(page.locator("#rates")).to_contain_text("per vCPU-second")
    expect(page.locator("#usage-chart .tick.x")).to_have_text(["5", "4", "3", "2", "1", "now"])
    expect(page.locator("#usage-chart .axis-title")).to_have_text(
        ["seconds per 10 s", "minutes ago"]
    )
    expect(page.locator("#model-note")).to_contain_text("your provider")
    expect(page.locator("#cost-duration")).to_contain_text("$")
    expect(page.locator("#model-cpu")).to_be_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    say(page, "Show me a table:\n\n| ship | guns |\n| --- | --- |\n| Revenge | 40 |")
    expect(reply(page, 2)).to_have_attribute("data-status", "complete")
    expect(reply(page, 2).locator("table")).to_be_visible()
    mode = server.env.get("PARLEY_AUTH", "open")
    page.screenshot(path=str(ARTIFACTS / f"desktop-{mode}.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_role("button", name="New chat")).not_to_be_in_viewport()
    page.screenshot(path=str(ARTIFACTS / f"phone-{mode}.png"), full_page=True)
    page.get_by_role("button", name="Show conversations").click()
    expect(page.get_by_role("button", name="New chat")).to_be_in_viewport()


def lambda_seconds() -> object:
    import re

    return re.compile(r"^\d+\.\d{3} s$")


# --- Provider limits -----------------------------------------------------------------


def test_a_queued_reply_says_where_it_waits_and_can_be_stopped(
    browser: Browser, make_server: Callable[..., ParleyServer], provider: FakeProvider
) -> None:
    """With one model call at a time, a reply waits its turn and the page says so."""
    limited = make_server(PARLEY_LLM_CONCURRENCY="1").start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    watched = Watched(page, limited.url)
    provider.hold()
    try:
        # Another sailor's reply takes the only slot, and keeps it until released.
        hog = unique("[hang] the only slot is mine")
        with as_user(limited.client(), unique("hog")) as http:
            send(http, new_conversation(http), hog)
        deadline = time.monotonic() + 15
        while not provider.calls_for(hog):
            assert time.monotonic() < deadline, "the first turn never reached the model"
            time.sleep(0.05)

        sign_in(page, limited)
        say(page, "[slow:0.05] a message that must wait")
        waiting = reply(page, 1)
        expect(waiting.locator(".waiting")).to_have_text(
            "Waiting for the model (position 1)", timeout=10_000
        )
        # A status, not the reply's text.
        expect(waiting.locator(".content")).to_be_empty()
        # Stop works while it waits.
        page.get_by_role("button", name="Stop").click()
        expect(waiting).to_have_attribute("data-status", "stopped", timeout=10_000)
        expect(waiting).to_contain_text("Stopped.")
        expect(waiting.locator(".waiting")).to_have_count(0)

        text = unique("[slow:0.05] a message that waits its turn")
        say(page, text)
        queued = reply(page, 2)
        expect(queued.locator(".waiting")).to_have_text(
            "Waiting for the model (position 1)", timeout=10_000
        )
        provider.release()
        expect(queued).to_have_attribute("data-status", "complete", timeout=20_000)
        expect(queued.locator(".content")).to_have_text(reply_for(text))
        expect(page.get_by_text("Waiting for the model")).to_have_count(0)
        assert watched.errors == []
    finally:
        provider.release()
        context.close()


# --- A restart, and the real model ---------------------------------------------------


def test_the_page_reconnects_by_itself_across_a_server_restart(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    restarting = make_server().start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        sign_in(page, restarting)
        say(page, SLOW)
        expect(reply(page, 1).locator(".content")).to_contain_text("word2")
        restarting.kill()
        expect(page.locator("#connection")).to_contain_text("reconnecting")
        restarting.start()
        resumed = reply(page, 1)
        expect(resumed).to_have_attribute("data-status", "complete", timeout=30_000)
        expect(resumed.locator(".content")).to_have_text(reply_for(SLOW))
        expect(page.locator("#connection")).to_be_hidden()
    finally:
        context.close()


def test_the_page_chats_with_the_local_model(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    local = make_server(local_model=True, PARLEY_MAX_REPLY_TOKENS="32").start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        sign_in(page, local)
        say(page, "What is the capital of France?")
        answer = reply(page, 1)
        # expect() waits 5 s by default, not the page's timeout: a real model on two
        # busy cores can take longer than that to answer.
        expect(answer).to_have_attribute("data-status", "complete", timeout=60_000)
        assert answer.locator(".content").inner_text().strip()
        expect(page.locator("#model-cpu")).to_be_visible()
        expect(page.locator("#usage-chart polyline")).to_have_count(3)
    finally:
        context.close()


def test_accounts_mode_signs_up_chats_signs_out_and_in(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    """The page in accounts mode, under its Content-Security-Policy."""
    guarded = make_server(PARLEY_AUTH="accounts").start()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    watched = Watched(page, guarded.url)
    try:
        page.goto(guarded.url)
        name = unique("captain")
        page.get_by_label("Your name").fill(name)
        page.get_by_label("Password").fill("short")
        page.get_by_role("button", name="Create an account").click()
        expect(page.locator("#sign-in-error")).to_contain_text("password")
        page.get_by_label("Password").fill("a long enough secret")
        page.get_by_role("button", name="Create an account").click()
        expect(page.locator("#who")).to_have_text(name)
        say(page, "[slow:0.05] ahoy from a signed-in captain")
        expect(reply(page, 1)).to_have_attribute("data-status", "complete")

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Password")).to_be_visible()
        page.reload()
        expect(page.get_by_label("Password")).to_be_visible()  # the session is gone
        page.get_by_label("Your name").fill(name)
        page.get_by_label("Password").fill("a long enough secret")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator(".conversation-item .open")).to_have_count(1)
        page.locator(".conversation-item .open").click()
        expect(reply(page, 1).locator(".content")).to_have_text(
            reply_for("[slow:0.05] ahoy from a signed-in captain")
        )
        assert watched.errors == [] and watched.foreign_requests == []
    finally:
        context.close()


# --- Searching, export and import ----------------------------------------------------


def page_api(page: Page, method: str, path: str, body: object = None) -> dict:
    """A request from the page, as its user (their cookie, and in accounts mode the
    session's CSRF token): ``{"status", "json"}``."""
    return page.evaluate(
        """async ([method, path, body]) => {
            const csrf = document.cookie.split("; ").find((c) => c.startsWith("parley_csrf="));
            const headers = { "Content-Type": "application/json" };
            if (csrf) headers["X-CSRF-Token"] = decodeURIComponent(csrf.slice(12));
            const response = await fetch(path, {
                method, headers, body: body === null ? undefined : JSON.stringify(body),
            });
            const text = await response.text();
            return { status: response.status, json: text ? JSON.parse(text) : null };
        }""",
        [method, path, body],
    )


def chat(page: Page, conversation: str, text: str) -> None:
    """Send ``text`` from the page's user and wait for the reply to be written."""
    sent = page_api(page, "POST", f"/api/conversations/{conversation}/messages", {"content": text})
    assert sent["status"] == 202, sent
    events = page.evaluate("url => fetch(url).then((r) => r.text())", sent["json"]["stream_url"])
    assert "event: done" in events, events


def parley_document(title: str, texts: list[str]) -> bytes:
    """A Parley export of one conversation: ``texts`` said in turn by the user and the
    model, each one answering the one before."""
    messages: list[dict[str, object]] = []
    for i, text in enumerate(texts):
        messages.append(
            {
                "id": i + 1,
                "role": "assistant" if i % 2 else "user",
                "content": text,
                "created_at": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
                **({"parent_id": i} if i else {}),
            }
        )
    moment = "2025-01-01T00:00:00Z"
    conversation = {"id": "x1", "title": title, "created_at": moment, "updated_at": moment}
    document = {"format": "parley", "version": 1, "conversations": [conversation]}
    conversation["messages"] = messages
    return json.dumps(document).encode()


def parley_export(title: str, said: str = "hi") -> bytes:
    return parley_document(title, [said, "hello"])


def searched_for(page: Page, box: Locator, text: str) -> None:
    """Type a query and wait for its answer: results of the query before may still show
    until it comes."""
    with page.expect_response(lambda r: "/api/search?" in r.url and r.request.method == "GET"):
        box.fill(text)


def test_search_finds_messages_and_opens_them_where_they_are(
    watched: Watched, server: ParleyServer
) -> None:
    page = watched.page
    sign_in(page, server)
    # A long conversation (imported: accounts mode limits the turns a minute), its first
    # message older than the branch's last page of 50.
    fillers = [text for i in range(35) for text in (f"entry {i}", f"noted {i}")]
    long_ago = ["Doubloons buried under the old oak", "Arr, dig there", *fillers]
    imported = page_api(page, "POST", "/api/import", json.loads(parley_document("Log", long_ago)))
    assert imported["status"] == 201, imported
    (logbook,) = imported["json"]["conversations"]
    dessert = page_api(page, "POST", "/api/conversations")["json"]["id"]
    chat(page, dessert, "Crème brûlée recipe")
    sea = page_api(page, "POST", "/api/conversations")["json"]["id"]
    chat(page, sea, "Kraken sightings near Tortuga")
    # A reply regenerated: its first version is on a branch that is not the current one.
    maps = page_api(page, "POST", "/api/conversations")["json"]["id"]
    question = unique("[nth] where is the treasure map")  # taken afresh by each test
    chat(page, maps, question)
    first = page_api(page, "GET", f"/api/conversations/{maps}/messages")["json"]["messages"][1]
    again = page_api(page, "POST", f"/api/conversations/{maps}/messages/{first['id']}/regenerate")
    assert again["status"] == 202, again
    page.evaluate("url => fetch(url).then((r) => r.text())", again["json"]["stream_url"])
    page.reload()  # the sidebar lists them; the latest (the map, second version) opens
    expect(reply(page, 1).locator(".content")).to_have_text(take_for(question, 2))

    box = page.get_by_role("searchbox", name="Search messages")
    conversations = page.locator("#conversation-list")
    results = page.locator("#result-list .result")
    status = page.locator("#search-status")
    found = page.locator("#messages .message.found")
    expect(box).to_have_attribute("placeholder", "Search messages")

    # Words in any order, any case, no accents; the last one a prefix.
    with page.expect_response(lambda r: "/api/search?" in r.url) as searched:
        box.fill("BRULEE cre")
    hits = searched.value.json()["results"]
    expect(results).to_have_count(2)  # the message and the model's echo of it, nothing else
    expect(conversations).to_be_hidden()
    expect(results.locator(".result-title")).to_have_text(["Crème brûlée recipe"] * 2)
    assert sorted(results.locator(".result-role").all_text_contents()) == ["Parley", "You"]
    for result in results.all():
        expect(result.locator(".snippet mark")).to_have_text(["Crème", "brûlée"])
    mine = results.filter(has=page.locator(".result-role", has_text="You"))
    expect(mine.locator(".snippet")).to_have_text("Crème brûlée recipe")
    (hit,) = [h for h in hits if h["role"] == "user"]
    mine.locator("a").click()
    expect(page).to_have_url(re.compile(rf"\?c={dessert}$"))
    expect(found).to_have_count(1)
    expect(found).to_have_attribute("data-id", str(hit["message_id"]))
    expect(found.locator(".content")).to_have_text("Crème brûlée recipe")
    expect(found).to_be_in_viewport()
    expect(found).to_have_count(0, timeout=10_000)  # highlighted for a moment only
    expect(box).to_have_value("BRULEE cre")  # the results stay, for the next one

    # An old message: the branch is loaded back to it, each message once.
    searched_for(page, box, "oak doubloon")
    expect(results).to_have_count(1)
    results.locator("a").click()
    expect(page).to_have_url(re.compile(rf"\?c={logbook}$"))
    expect(found.locator(".content")).to_have_text(long_ago[0])
    expect(found).to_be_in_viewport()
    messages = page.locator("#messages .message")
    expect(messages).to_have_count(len(long_ago))
    assert [t.strip() for t in messages.locator(".content").all_text_contents()] == long_ago

    # A hit on another branch opens that branch.
    searched_for(page, box, "1 TAKE treasure")  # "1" whole: the map's id may start with 1
    expect(results).to_have_count(1)
    expect(results.locator(".result-role")).to_have_text("Parley")
    results.locator("a").click()
    expect(page).to_have_url(re.compile(rf"\?c={maps}$"))
    shown = reply(page, 1)
    expect(shown.locator(".content")).to_have_text(take_for(question, 1))
    expect(shown.locator(".version")).to_have_text("1/2")
    expect(shown).to_have_class(re.compile(r"\bfound\b"))
    page.reload()  # and makes it the conversation's current branch
    expect(reply(page, 1).locator(".content")).to_have_text(take_for(question, 1))

    # Pages of results; nothing found; a query with no word is refused, inline.
    searched_for(page, box, "entry")
    expect(results).to_have_count(20)
    more = page.get_by_role("button", name="More results")
    more.click()
    expect(results).to_have_count(35)
    expect(more).to_be_hidden()
    snippets = results.locator(".snippet").all_text_contents()
    assert sorted(snippets) == sorted(f"entry {i}" for i in range(35))
    searched_for(page, box, "zzyzx")
    expect(status).to_have_text("No messages match")
    expect(results).to_have_count(0)
    searched_for(page, box, "?!…")
    expect(status).to_have_text("The search must hold a word (letters or digits).")
    expect(status).to_have_class(re.compile(r"\bfailure\b"))
    expect(results).to_have_count(0)

    # Clearing the box, or Escape, brings the conversations back.
    box.fill("")
    expect(conversations).to_be_visible()
    expect(page.locator("#search-results")).to_be_hidden()
    expect(page.locator(".conversation-item")).to_have_count(4)
    searched_for(page, box, "kraken")
    expect(results).to_have_count(2)
    box.press("Escape")
    expect(box).to_have_value("")
    expect(conversations).to_be_visible()
    expect(page.locator(".conversation-item")).to_have_count(4)

    # On a phone, a result closes the sidebar as a conversation of the list does.
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("button", name="Show conversations").click()
    searched_for(page, box, "kraken sight")
    results.filter(has=page.locator(".result-role", has_text="You")).locator("a").click()
    expect(page).to_have_url(re.compile(rf"\?c={sea}$"))
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bsidebar-open\b"))
    expect(found).to_be_in_viewport()
    assert watched.errors == [] and watched.dialogs == [] and watched.foreign_requests == []


def test_import_a_file_and_export_conversations(watched: Watched, server: ParleyServer) -> None:
    page = watched.page
    sign_in(page, server)
    status = page.locator("#import-status")
    items = page.locator(".conversation-item .open")

    def import_file(name: str, content: bytes) -> None:
        with page.expect_file_chooser() as chosen:
            page.get_by_role("button", name="Import").click()
        chosen.value.set_files(
            files=[{"name": name, "mimeType": "application/json", "buffer": content}]
        )

    title = unique("Logbook")
    with page.expect_response(lambda r: r.url.endswith("/api/import")) as answered:
        import_file("parley.json", parley_export(title, "ahoy from the archive"))
    assert answered.value.status == 201
    (imported,) = answered.value.json()["conversations"]
    expect(status).to_have_text("Imported 1 conversation")
    expect(items).to_have_text([title])

    # The same file again: nothing new, and it says so.
    import_file("parley.json", parley_export(title, "ahoy from the archive"))
    expect(status).to_have_text("Nothing new: that conversation is already here")
    expect(items).to_have_count(1)

    # A broken file: what is wrong and where, and nothing imported.
    broken = parley_export(unique("Broken")).replace(b'"role": "user"', b'"role": "pirate"')
    import_file("broken.json", broken)
    expect(status).to_contain_text("Not imported: conversations[0].messages[0].role: ")
    expect(status).to_have_class(re.compile(r"\bfailure\b"))
    import_file("notes.txt", b"not json at all")
    expect(status).to_have_text(
        re.compile(r"^Not imported: the file is not a Parley export .*ChatGPT")
    )
    expect(items).to_have_text([title])

    # Export: every conversation, and the open one as Markdown or JSON.
    export_all = page.get_by_role("link", name="Export all")
    expect(export_all).to_have_attribute("href", "/api/export")
    expect(export_all).to_have_attribute("download", "")
    menu = page.locator("#export")
    expect(menu).to_be_hidden()  # no conversation open yet
    items.first.click()
    expect(page.locator(".message.user .content")).to_have_text(["ahoy from the archive"])
    page.get_by_text("Export", exact=True).click()
    markdown = page.get_by_role("link", name="Markdown")
    as_json = page.get_by_role("link", name="JSON")
    expect(markdown).to_be_visible()
    expect(markdown).to_have_attribute(
        "href", f"/api/conversations/{imported}/export?format=markdown"
    )
    expect(as_json).to_have_attribute("href", f"/api/conversations/{imported}/export?format=json")
    for link in (markdown, as_json):
        expect(link).to_have_attribute("download", "")
    with page.expect_download() as downloaded:
        markdown.click()
    assert downloaded.value.suggested_filename == f"parley-{imported}.md"
    assert "ahoy from the archive" in Path(downloaded.value.path()).read_text()
    expect(markdown).to_be_hidden()  # the menu closed
    assert watched.errors == [] and watched.dialogs == []
