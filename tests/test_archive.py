"""Exports and imports (``/api/conversations/{id}/export``, ``/api/export``,
``/api/import``), through a running server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import copy
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.api_client import as_user, messages, new_conversation, send_and_finish, stream
from tests.conftest import ParleyServer, unique
from tests.fake_provider import FakeProvider, reply_for, take_for
from tests.test_branches import branch, contents, edit, finish, regenerate, shown_before

# --- A ChatGPT export, written for these tests ------------------------------------------
# The shape of ChatGPT's conversations.json: a list of conversations, each a tree of nodes
# ("mapping") whose messages name an author role and content parts. This one has a hidden
# system message, an edited question (two user versions), a regenerated answer (two
# assistant versions), an answer in two parts around a tool's output, an image, and a
# current node on the edited branch.


def _node(
    node_id: str,
    parent: str | None,
    children: list[str],
    role: str | None = None,
    parts: list[Any] | None = None,
    at: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    message = None
    if role is not None:
        message = {
            "id": node_id,
            "author": {"role": role, "name": None, "metadata": {}},
            "create_time": at,
            "update_time": None,
            "content": {"content_type": "text", "parts": parts or []},
            "status": "finished_successfully",
            "metadata": extra.pop("metadata", {}),
            "recipient": "all",
            **extra,
        }
    return {"id": node_id, "message": message, "parent": parent, "children": children}


def chatgpt_export(tag: str) -> list[dict[str, Any]]:
    t = 1_700_000_000.0
    mapping = {
        "root": _node("root", None, ["sys"]),
        "sys": _node(
            "sys",
            "root",
            ["q1"],
            "system",
            [""],
            t,
            metadata={"is_visually_hidden_from_conversation": True},
        ),
        "q1": _node("q1", "sys", ["a1", "a1b"], "user", [f"{tag} How do tides work?"], t + 1),
        "a1": _node("a1", "q1", ["q2"], "assistant", ["The Moon pulls the sea."], t + 2),
        "a1b": _node("a1b", "q1", [], "assistant", ["Gravity, mostly the Moon's."], t + 3),
        "q2": _node("q2", "a1", ["pre"], "user", ["Compute the period?"], t + 4),
        "pre": _node("pre", "q2", ["code"], "assistant", ["Let me compute."], t + 4.5),
        "code": _node(
            "code",
            "pre",
            ["tool"],
            "assistant",
            None,
            t + 5,
        ),
        "tool": _node("tool", "code", ["a2"], "tool", ["12.42"], t + 6),
        "a2": _node("a2", "tool", [], "assistant", ["About 12.42 hours."], t + 7),
        "q2b": _node("q2b", "a1", ["a3"], "user", ["And in French, café?"], t + 8),
        "a3": _node("a3", "q2b", ["q4"], "assistant", ["Les marées."], t + 9),
        "q4": _node(
            "q4",
            "a3",
            [],
            "user",
            [{"content_type": "image_asset_pointer", "asset_pointer": "file-service://x"}],
            t + 10,
        ),
    }
    mapping["a1"]["children"] = ["q2", "q2b"]
    mapping["code"]["message"]["recipient"] = "python"
    mapping["code"]["message"]["content"] = {
        "content_type": "code",
        "language": "python",
        "text": "print(12.42)",
    }
    second = {
        "title": f"{tag} Short one",
        "create_time": t + 100,
        "update_time": t + 101,
        "conversation_id": f"{tag}-two",
        "current_node": "b",
        "mapping": {
            "r": _node("r", None, ["a"]),
            "a": _node("a", "r", ["b"], "user", ["Hello there"], t + 100),
            "b": _node("b", "a", [], "assistant", ["General Kenobi."], t + 101),
        },
    }
    first = {
        "title": f"{tag} Tides",
        "create_time": t,
        "update_time": t + 10,
        "conversation_id": f"{tag}-one",
        "id": f"{tag}-one",
        "current_node": "q4",
        "mapping": mapping,
        "moderation_results": [],
        "plugin_ids": None,
    }
    return [first, second]


# --- Helpers ----------------------------------------------------------------------------


def do_import(http: httpx.Client, document: Any, expect: int = 201) -> dict[str, Any]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    answer = http.post("/api/import", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == expect, answer.text
    return answer.json()


def export_all(http: httpx.Client) -> dict[str, Any]:
    answer = http.get("/api/export")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert "attachment" in answer.headers["content-disposition"]
    return answer.json()


def export_one(http: httpx.Client, conversation: str, format: str = "json") -> httpx.Response:
    answer = http.get(f"/api/conversations/{conversation}/export", params={"format": format})
    assert answer.status_code == 200, answer.text
    return answer


def shape(conversation: dict[str, Any]) -> dict[str, Any]:
    """A conversation as an export gives it, with its ids replaced by positions: what a
    round trip must keep."""
    position = {m["id"]: i for i, m in enumerate(conversation["messages"])}
    return {
        **{k: v for k, v in conversation.items() if k not in ("id", "messages")},
        "current_message_id": position.get(conversation["current_message_id"]),
        "messages": [
            {
                **{k: v for k, v in m.items() if k not in ("id", "parent_id")},
                "parent": position.get(m["parent_id"]),
            }
            for m in conversation["messages"]
        ],
    }


def count_conversations(http: httpx.Client) -> int:
    return len(http.get("/api/conversations", params={"limit": 200}).json()["conversations"])


@pytest.fixture
def http(client: httpx.Client) -> httpx.Client:
    return as_user(client, unique("archivist"))


def other(client: httpx.Client, name: str) -> httpx.Client:
    return as_user(httpx.Client(base_url=client.base_url, timeout=30), unique(name))


def branched_conversation(http: httpx.Client) -> tuple[str, list[str]]:
    """A conversation with a regenerated reply and an edited message: three branches."""
    conversation = new_conversation(http)
    one, two = unique("[nth] first question"), unique("second question")
    send_and_finish(http, conversation, one)
    send_and_finish(http, conversation, two)
    _asked, reply, asked_two, _ = messages(http, conversation)
    finish(http, regenerate(http, conversation, reply["id"]))
    changed = unique("second, changed")
    finish(http, edit(http, conversation, asked_two["id"], changed))
    return conversation, [one, two, changed]


# --- Export -----------------------------------------------------------------------------


def test_a_conversation_exports_every_branch_as_json_and_its_current_one_as_markdown(
    http: httpx.Client,
) -> None:
    conversation, (one, two, changed) = branched_conversation(http)
    http.patch(
        f"/api/conversations/{conversation}",
        json={"title": "Tides & <moons>", "system_prompt": "Answer like a pirate."},
    )
    shown = branch(http, conversation)
    document = export_one(http, conversation).json()
    assert (document["format"], document["version"]) == ("parley", 1)
    (exported,) = document["conversations"]
    assert exported["id"] == conversation
    assert exported["title"] == "Tides & <moons>"
    assert exported["system_prompt"] == "Answer like a pirate."
    assert exported["model"] is None
    said = exported["messages"]
    assert [m["content"] for m in said] == [
        one,
        take_for(one, 1),
        two,
        reply_for(two),
        take_for(one, 2),
        changed,
        reply_for(changed),
    ]
    by_id = {m["id"]: m for m in said}
    assert by_id[said[4]["id"]]["parent_id"] == said[0]["id"]  # the regenerated reply
    assert said[5]["parent_id"] == said[1]["id"]  # the edit, beside "two"
    assert exported["current_message_id"] == shown[-1]["id"]
    assert all(m["status"] == "complete" for m in said)
    assert all(m["created_at"].endswith("Z") for m in said)

    text = export_one(http, conversation, "markdown")
    assert text.headers["content-type"] == "text/markdown; charset=utf-8"
    assert f"parley-{conversation}.md" in text.headers["content-disposition"]
    markdown = text.text
    assert markdown.startswith("# Tides & <moons>\n")
    assert "Answer like a pirate." in markdown
    for message in shown:
        assert message["content"] in markdown
    assert reply_for(two) not in markdown  # another branch
    assert markdown.index(one) < markdown.index(changed) < markdown.index(reply_for(changed))


def test_exports_are_the_callers_only(http: httpx.Client, client: httpx.Client) -> None:
    conversation = new_conversation(http)
    send_and_finish(http, conversation, unique("mine"))
    stranger = other(client, "stranger")
    for format in ("json", "markdown"):
        answer = stranger.get(
            f"/api/conversations/{conversation}/export", params={"format": format}
        )
        assert answer.status_code == 404
    assert export_all(stranger)["conversations"] == []
    for bad in ("xml", "", "JSON"):
        answer = http.get(f"/api/conversations/{conversation}/export", params={"format": bad})
        assert answer.status_code == 422
    assert http.get("/api/conversations/not-an-id/export").status_code in (404, 422)


def test_exporting_everything_streams_every_conversation(http: httpx.Client) -> None:
    made = set()
    for i in range(120):  # more than a page of the export's reads
        conversation = http.post("/api/conversations", json={"title": f"c{i}"}).json()["id"]
        made.add(conversation)
    with http.stream("GET", "/api/export") as answer:
        assert answer.status_code == 200
        assert "content-length" not in answer.headers  # written while read
        body = b"".join(answer.iter_bytes())
    document = json.loads(body)
    assert {c["id"] for c in document["conversations"]} == made
    assert {c["title"] for c in document["conversations"]} == {f"c{i}" for i in range(120)}


# --- Import: round trips ------------------------------------------------------------------


def test_an_export_imported_elsewhere_is_the_same_and_chats_on(
    http: httpx.Client, client: httpx.Client, provider: FakeProvider
) -> None:
    conversation, (one, _two, changed) = branched_conversation(http)
    http.patch(f"/api/conversations/{conversation}", json={"system_prompt": "Be brief."})
    plain = new_conversation(http)
    send_and_finish(http, plain, unique("a plain one"))
    exported = export_all(http)

    copyist = other(client, "copyist")
    result = do_import(copyist, exported)
    assert (result["created"], result["skipped"]) == (2, 0)
    again = export_all(copyist)
    ours = {c["title"]: shape(c) for c in exported["conversations"]}
    theirs = {c["title"]: shape(c) for c in again["conversations"]}
    assert theirs == ours
    assert set(result["conversations"]) == {c["id"] for c in again["conversations"]}

    # The imported conversation shows the same branch, with its versions, and goes on
    # from it: the model is shown that branch.
    (imported,) = [
        c["id"] for c in again["conversations"] if c["title"] == shape_title(exported, conversation)
    ]
    assert contents(branch(copyist, imported)) == contents(branch(http, conversation))
    assert [m["siblings"] != [m["id"]] for m in branch(copyist, imported)] == [
        m["siblings"] != [m["id"]] for m in branch(http, conversation)
    ]
    follow_up = unique("and then?")
    send_and_finish(copyist, imported, follow_up)
    assert shown_before(provider, follow_up) == [
        one,
        take_for(one, 1),
        changed,
        reply_for(changed),
    ]
    assert provider.calls_for(follow_up)[0].messages[0]["content"].startswith("Be brief.")

    # Importing the file again, or into the account it came from, creates nothing.
    assert do_import(copyist, exported, expect=200) == {
        "created": 0,
        "skipped": 2,
        "conversations": [],
    }
    assert do_import(http, exported, expect=200)["skipped"] == 2
    assert count_conversations(http) == 2
    assert count_conversations(copyist) == 2

    # Imported text is searchable, for its new owner only.
    word = one.split()[-1]
    hits = copyist.get("/api/search", params={"q": word}).json()["results"]
    assert {h["conversation_id"] for h in hits} == {imported}


def shape_title(document: dict[str, Any], conversation: str) -> str:
    return next(c["title"] for c in document["conversations"] if c["id"] == conversation)


def test_a_chatgpt_export_keeps_titles_times_and_branches(
    http: httpx.Client, provider: FakeProvider
) -> None:
    tag = unique("gpt")
    result = do_import(http, chatgpt_export(tag))
    assert (result["created"], result["skipped"]) == (2, 0)
    listed = {c["title"]: c for c in http.get("/api/conversations").json()["conversations"]}
    assert set(listed) == {f"{tag} Tides", f"{tag} Short one"}
    tides = listed[f"{tag} Tides"]
    assert tides["created_at"].startswith("2023-11-14T22:13:20")
    assert tides["updated_at"].startswith("2023-11-14T22:13:30")

    # The current node was on the edited branch, ending with an image.
    shown = branch(http, tides["id"])
    assert contents(shown) == [
        f"{tag} How do tides work?",
        "The Moon pulls the sea.",
        "And in French, café?",
        "Les marées.",
        "[an attachment that was not imported]",
    ]
    assert [m["role"] for m in shown] == ["user", "assistant", "user", "assistant", "user"]
    assert shown[0]["parent_id"] is None
    assert [m["parent_id"] for m in shown[1:]] == [m["id"] for m in shown[:-1]]
    # Versions: the regenerated answer, and the edited question.
    assert len(shown[1]["siblings"]) == 2
    assert len(shown[2]["siblings"]) == 2
    # The other version of the question, its answer in two parts joined, the tool's
    # output and the hidden system message left out.
    other_version = next(s for s in shown[2]["siblings"] if s != shown[2]["id"])
    older = branch(http, tides["id"], leaf=other_version)
    assert contents(older) == [
        f"{tag} How do tides work?",
        "The Moon pulls the sea.",
        "Compute the period?",
        "Let me compute.\n\nAbout 12.42 hours.",
    ]
    regenerated = next(s for s in shown[1]["siblings"] if s != shown[1]["id"])
    assert contents(branch(http, tides["id"], leaf=regenerated))[-1] == (
        "Gravity, mostly the Moon's."
    )

    # It chats on from the branch it shows now.
    follow_up = unique("more?")
    send_and_finish(http, tides["id"], follow_up)
    assert shown_before(provider, follow_up) == [
        f"{tag} How do tides work?",
        "Gravity, mostly the Moon's.",
    ]

    assert do_import(http, chatgpt_export(tag), expect=200)["skipped"] == 2
    assert count_conversations(http) == 2


def test_parallel_imports_of_one_file_create_each_conversation_once(
    http: httpx.Client, client: httpx.Client
) -> None:
    tag = unique("twins")
    document = json.dumps(chatgpt_export(tag)).encode()
    user = http.headers["X-Parley-User"]

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            return as_user(own, user).post(
                "/api/import", content=document, headers={"Content-Type": "application/json"}
            )

    # Ten: as many as a process takes at once (two importing, eight waiting).
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(10)))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
    assert sum(a.json()["created"] for a in answers) == 2
    assert sum(a.json()["skipped"] for a in answers) == 18
    assert count_conversations(http) == 2


# --- Import: bad files ----------------------------------------------------------------------


def _parley_document() -> dict[str, Any]:
    return {
        "format": "parley",
        "version": 1,
        "conversations": [
            {
                "id": "x1",
                "title": "T",
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
                "messages": [
                    {
                        "id": 1,
                        "role": "user",
                        "content": "hi",
                        "created_at": "2026-01-01T00:00:00Z",
                    },
                    {
                        "id": 2,
                        "parent_id": 1,
                        "role": "assistant",
                        "content": "hello",
                        "created_at": "2026-01-01T00:00:01Z",
                    },
                ],
            }
        ],
    }


def _changed(path: list[Any], value: Any, base: Any = None) -> Any:
    document = copy.deepcopy(base if base is not None else _parley_document())
    at = document
    for step in path[:-1]:
        at = at[step]
    at[path[-1]] = value
    return document


BAD_FILES: list[tuple[str, Callable[[], Any]]] = [
    ("not JSON", lambda: b"hello"),
    ("truncated", lambda: json.dumps(_parley_document()).encode()[:-20]),
    ("a JSON string", lambda: b'"conversations"'),
    ("another format", lambda: _changed(["format"], "other")),
    ("a later version", lambda: _changed(["version"], 2)),
    ("no conversations", lambda: {"format": "parley", "version": 1}),
    (
        "a message of a third role",
        lambda: _changed(["conversations", 0, "messages", 0, "role"], "system"),
    ),
    ("content not text", lambda: _changed(["conversations", 0, "messages", 0, "content"], 5)),
    ("a NUL", lambda: _changed(["conversations", 0, "messages", 0, "content"], "a\x00b")),
    (
        "a lone surrogate",
        lambda: json.dumps(_parley_document()).replace("hello", "\\ud800").encode(),
    ),
    ("NaN", lambda: json.dumps(_parley_document()).replace('"id": 1,', '"id": NaN,').encode()),
    ("a huge id", lambda: _changed(["conversations", 0, "messages", 0, "id"], 10**30)),
    ("an unknown parent", lambda: _changed(["conversations", 0, "messages", 1, "parent_id"], 7)),
    ("a repeated id", lambda: _changed(["conversations", 0, "messages", 1, "id"], 1)),
    ("an unknown current message", lambda: _changed(["conversations", 0, "current_message_id"], 9)),
    ("no time", lambda: _changed(["conversations", 0, "created_at"], None)),
    ("a time that is not one", lambda: _changed(["conversations", 0, "updated_at"], "yesterday")),
    (
        "a status of its own",
        lambda: _changed(["conversations", 0, "messages", 1, "status"], "streaming"),
    ),
    ("deep nesting", lambda: b"[" * 100_000 + b"]" * 100_000),
    ("a list of strings", lambda: b'["a", "b"]'),
    ("ChatGPT: no mapping", lambda: [{"title": "x"}]),
    (
        "ChatGPT: an unknown parent",
        lambda: _changed([1, "mapping", "a", "parent"], "nowhere", chatgpt_export("x")),
    ),
    ("ChatGPT: a cycle", lambda: _changed([1, "mapping", "r", "parent"], "b", chatgpt_export("x"))),
    (
        "ChatGPT: a NUL",
        lambda: _changed(
            [1, "mapping", "a", "message", "content", "parts"], ["a\x00"], chatgpt_export("x")
        ),
    ),
    (
        "ChatGPT: NaN time",
        lambda: json.dumps(chatgpt_export("x")).replace("1700000100.0", "NaN").encode(),
    ),
    (
        "ChatGPT: a time past year 9999",
        lambda: _changed([0, "create_time"], 1e300, chatgpt_export("x")),
    ),
    (
        "a time UTC cannot hold",
        lambda: _changed(["conversations", 0, "created_at"], "0001-01-01T00:00:00+01:00"),
    ),
    (
        "a message time UTC cannot hold",
        lambda: _changed(
            ["conversations", 0, "messages", 0, "created_at"], "9999-12-31T23:59:59-01:00"
        ),
    ),
    (
        "a reply answering no user message",
        lambda: _changed(["conversations", 0, "messages", 1, "parent_id"], None),
    ),
    (
        "a user message after a user message",
        lambda: _changed(["conversations", 0, "messages", 1, "role"], "user"),
    ),
    (
        "instructions too long",
        lambda: _changed(["conversations", 0, "system_prompt"], "x" * 16_001),
    ),
    (
        "ChatGPT: a time that is true",
        lambda: _changed([0, "create_time"], True, chatgpt_export("x")),
    ),
    (
        "ChatGPT: a time as text",
        lambda: _changed([0, "update_time"], "1700000000", chatgpt_export("x")),
    ),
    ("ChatGPT: a title not text", lambda: _changed([0, "title"], ["x"], chatgpt_export("x"))),
]


@pytest.mark.parametrize(("what", "make"), BAD_FILES, ids=[what for what, _ in BAD_FILES])
def test_a_bad_file_is_refused_whole_and_says_why(
    http: httpx.Client, what: str, make: Callable[[], Any]
) -> None:
    # A good conversation first in the file: all or nothing means it is not imported.
    made = make()
    if isinstance(made, dict) and "conversations" in made:
        made["conversations"].insert(0, _parley_document()["conversations"][0] | {"id": "good"})
    elif isinstance(made, list) and made and isinstance(made[0], dict):
        made.insert(0, chatgpt_export(unique("good"))[1])
    answer = http.post(
        "/api/import",
        content=made if isinstance(made, bytes) else json.dumps(made).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422, (what, answer.text)
    problems = answer.json()["detail"]
    assert problems and all(p["loc"][0] == "body" and p["msg"] for p in problems), problems
    assert count_conversations(http) == 0


def test_an_empty_or_too_large_file_is_refused(
    make_server: Callable[..., ParleyServer], database_url: str | None
) -> None:
    server = make_server(database_url, PARLEY_MAX_IMPORT_BYTES="2048").start()
    with server.client() as http:
        as_user(http, unique("big"))
        assert http.post("/api/import", content=b"").status_code == 422
        document = _parley_document()
        document["conversations"][0]["messages"][0]["content"] = "x" * 3000
        body = json.dumps(document).encode()
        answer = http.post("/api/import", content=body)
        assert answer.status_code == 413

        # Sent in chunks, without a length: counted as it comes.
        def chunks() -> Any:
            for start in range(0, len(body), 500):
                yield body[start : start + 500]

        assert http.post("/api/import", content=chunks()).status_code == 413
        assert count_conversations(http) == 0
        document["conversations"][0]["messages"][0]["content"] = "small"
        assert do_import(http, document)["created"] == 1


def test_a_file_larger_than_other_requests_imports(http: httpx.Client) -> None:
    document = _parley_document()
    reply = document["conversations"][0]["messages"][1]
    reply["content"] = "A long reply. " * 40_000  # 560 KB: more than PARLEY_MAX_BODY_BYTES
    assert do_import(http, document)["created"] == 1
    (imported,) = export_all(http)["conversations"]
    assert imported["messages"][1]["content"] == reply["content"]
    # Other requests keep their limit.
    answer = http.post("/api/conversations", json={"title": "x" * 300_000})
    assert answer.status_code == 413


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_deleted_import_is_gone_and_can_be_imported_again(http: httpx.Client) -> None:
    tag = unique("again")
    result = do_import(http, chatgpt_export(tag))
    for conversation in result["conversations"]:
        assert http.delete(f"/api/conversations/{conversation}").status_code == 204
    assert http.get("/api/search", params={"q": "Kenobi"}).json()["results"] == []
    assert do_import(http, chatgpt_export(tag))["created"] == 2
    hits = http.get("/api/search", params={"q": "general kenobi"}).json()["results"]
    assert len(hits) == 1


def test_a_message_sent_while_exporting_is_not_half_written(http: httpx.Client) -> None:
    conversation = new_conversation(http)
    turn = http.post(
        f"/api/conversations/{conversation}/messages",
        json={"content": "[slow:0.1] " + "word " * 40},
    ).json()["turn_id"]
    events = stream(http, turn)
    for event in events:
        if event.event == "token":
            break
    (exported,) = export_one(http, conversation).json()["conversations"]
    # The reply being written is left out; the branch ends at the question.
    assert [m["role"] for m in exported["messages"]] == ["user"]
    assert exported["current_message_id"] == exported["messages"][0]["id"]
    for _ in events:
        pass


def test_chatgpt_messages_are_shaped_as_parleys(http: httpx.Client) -> None:
    """A reply to no question is left out; a reply in parts with two endings becomes two
    versions of the whole reply; two questions in a row become one."""
    tag = unique("shape")
    t = 1_700_000_000.0
    mapping = {
        "root": _node("root", None, ["hello"]),
        "hello": _node("hello", "root", ["q1"], "assistant", ["I am a GPT, ask me."], t),
        "q1": _node("q1", "hello", ["q1b"], "user", [f"{tag} first half"], t + 1),
        "q1b": _node("q1b", "q1", ["a1"], "user", ["second half"], t + 2),
        "a1": _node("a1", "q1b", ["a2", "a3"], "assistant", ["Part one."], t + 3),
        "a2": _node("a2", "a1", [], "assistant", ["Then this."], t + 4),
        "a3": _node("a3", "a1", [], "assistant", ["Or that."], t + 5),
    }
    document = [
        {
            "title": tag,
            "create_time": t,
            "conversation_id": tag,
            "current_node": "a2",
            "mapping": mapping,
        }
    ]
    (conversation,) = do_import(http, document)["conversations"]
    shown = branch(http, conversation)
    assert contents(shown) == [f"{tag} first half\n\nsecond half", "Part one.\n\nThen this."]
    assert shown[0]["parent_id"] is None
    (other_version,) = [s for s in shown[1]["siblings"] if s != shown[1]["id"]]
    assert contents(branch(http, conversation, leaf=other_version)) == [
        f"{tag} first half\n\nsecond half",
        "Part one.\n\nOr that.",
    ]
