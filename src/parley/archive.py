"""Conversations out and in: exports (Parley's JSON, Markdown) and imports (Parley's JSON,
ChatGPT's ``conversations.json``).

Parley's JSON holds every branch of a conversation: its messages with their parents, the
message its current branch ends at, its title, model, instructions and times. Markdown
holds the current branch only, for reading.

An import is all or nothing: the whole file is checked before anything is written, and
then written in one transaction. Each imported conversation remembers where it came from
(``conversations.imported_from``, unique per owner), so importing a file again creates
nothing new, also when two imports of it run at once. Its messages get new ids, and the
model's memory of it needs no rebuilding: a turn reads the branch it continues from these
tables (``Store.turn_context``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from parley.api.validation import StorableText, check_instant, check_text
from parley.store import (
    MODEL_NAME_MAX_CHARS,
    TITLE_MAX_CHARS,
    ConversationNotFound,
    _aware,
    _title_from,
    check_account,
    conversations,
    messages,
)

FORMAT = "parley"
VERSION = 1
# The longest message an import takes (a reply can be far longer than a user message).
MAX_IMPORTED_CHARS = 1_000_000
# Conversations per page of an export of all of them.
_PAGE = 50
_SHOWN_STATUSES = ("complete", "stopped", "failed")


# --- Reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    parent_id: int | None
    role: str
    content: str
    status: str
    created_at: datetime
    error: str | None


@dataclass(frozen=True, slots=True)
class StoredConversation:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    model: str | None
    system_prompt: str | None
    current_message_id: int | None
    messages: list[StoredMessage]

    def current_branch(self) -> list[StoredMessage]:
        """The messages of the branch the conversation shows, oldest first."""
        by_id = {message.id: message for message in self.messages}
        at = by_id.get(self.current_message_id or 0)
        branch: list[StoredMessage] = []
        while at is not None:
            branch.append(at)
            at = by_id.get(at.parent_id) if at.parent_id is not None else None
        branch.reverse()
        return branch


_MESSAGE_COLUMNS = (
    messages.c.conversation_id,
    messages.c.id,
    messages.c.parent_id,
    messages.c.role,
    messages.c.content,
    messages.c.status,
    messages.c.created_at,
    messages.c.error,
)


async def _read(conn: AsyncConnection, rows: list[sa.Row[Any]]) -> list[StoredConversation]:
    """The conversations of ``rows`` with their messages (a reply still being written is
    left out: it has no text yet)."""
    if not rows:
        return []
    found: dict[str, list[StoredMessage]] = {row.id: [] for row in rows}
    query = (
        sa.select(*_MESSAGE_COLUMNS)
        .where(messages.c.conversation_id.in_(list(found)))
        .order_by(messages.c.conversation_id, messages.c.id)
    )
    writing: dict[int, int | None] = {}  # a reply being written: its parent
    for m in await conn.execute(query):
        if m.status not in _SHOWN_STATUSES:
            writing[m.id] = m.parent_id
            continue
        found[m.conversation_id].append(
            StoredMessage(
                m.id, m.parent_id, m.role, m.content, m.status, _aware(m.created_at), m.error
            )
        )
    out = []
    for row in rows:
        said = found[row.id]
        if not row.branched:
            # One line, read in id order: each message follows the one before (messages
            # written by a release before branches may have no parent set).
            said = [
                StoredMessage(
                    m.id,
                    said[i - 1].id if i else None,
                    m.role,
                    m.content,
                    m.status,
                    m.created_at,
                    m.error,
                )
                for i, m in enumerate(said)
            ]
        current = row.leaf_id if row.branched else (said[-1].id if said else None)
        if current in writing:
            current = writing[current]
        out.append(
            StoredConversation(
                id=row.id,
                title=row.title or "",
                created_at=_aware(row.created_at),
                updated_at=_aware(row.updated_at),
                model=row.model,
                system_prompt=row.system_prompt,
                current_message_id=current,
                messages=said,
            )
        )
    return out


async def read_conversation(
    engine: AsyncEngine, owner: str, conversation_id: str
) -> StoredConversation:
    query = sa.select(conversations).where(
        conversations.c.id == conversation_id, conversations.c.owner == owner
    )
    async with engine.connect() as conn:
        rows = list(await conn.execute(query))
        if not rows:
            raise ConversationNotFound(conversation_id)
        return (await _read(conn, rows))[0]


async def all_conversations(engine: AsyncEngine, owner: str) -> AsyncIterator[StoredConversation]:
    """Every conversation of ``owner``, a page at a time (never all in memory)."""
    after = ""
    while True:
        query = (
            sa.select(conversations)
            .where(conversations.c.owner == owner, conversations.c.id > after)
            .order_by(conversations.c.id)
            .limit(_PAGE)
        )
        async with engine.connect() as conn:
            page = await _read(conn, list(await conn.execute(query)))
        for conversation in page:
            yield conversation
        if len(page) < _PAGE:
            return
        after = page[-1].id


# --- Writing exports -------------------------------------------------------------------


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def conversation_json(conversation: StoredConversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "created_at": _when(conversation.created_at),
        "updated_at": _when(conversation.updated_at),
        "model": conversation.model,
        "system_prompt": conversation.system_prompt,
        "current_message_id": conversation.current_message_id,
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "error": m.error,
                "created_at": _when(m.created_at),
            }
            for m in conversation.messages
        ],
    }


async def json_document(found: AsyncIterator[StoredConversation]) -> AsyncIterator[bytes]:
    """Parley's export document, written a conversation at a time as they are read."""
    head = {"format": FORMAT, "version": VERSION, "exported_at": _when(datetime.now(UTC))}
    yield json.dumps(head, ensure_ascii=False)[:-1].encode() + b', "conversations": ['
    first = True
    async for conversation in found:
        # Off the event loop: a conversation may hold megabytes of text.
        text = await asyncio.to_thread(_dumps, conversation)
        yield (b"\n" if first else b",\n") + text
        first = False
    yield b"\n]}\n"


def _dumps(conversation: StoredConversation) -> bytes:
    return json.dumps(conversation_json(conversation), ensure_ascii=False).encode()


def markdown(conversation: StoredConversation) -> str:
    """The conversation's current branch as Markdown."""
    lines = [f"# {conversation.title or 'New chat'}", ""]
    about = f"*Exported from Parley on {_when(datetime.now(UTC))}"
    if conversation.model:
        about += f"; model: {conversation.model}"
    lines += [about + ".*", ""]
    if conversation.system_prompt:
        lines += ["**Instructions:**", "", conversation.system_prompt, ""]
    for message in conversation.current_branch():
        who = "You" if message.role == "user" else "Assistant"
        lines += ["---", "", f"### {who} · {_when(message.created_at)}", "", message.content, ""]
        if message.status == "stopped":
            lines += ["*(stopped)*", ""]
        elif message.status == "failed":
            lines += [f"*(failed: {message.error or 'no reply'})*", ""]
    return "\n".join(lines)


# --- Reading imports ---------------------------------------------------------------------


class ImportRefused(ValueError):
    """A file that cannot be imported: ``problems`` in FastAPI's 422 shape."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__(problems[0]["msg"] if problems else "cannot be imported")
        self.problems = problems


def _refused(location: Iterable[Any], message: str, kind: str = "value_error") -> ImportRefused:
    where = [_short(part) for part in location]
    return ImportRefused([{"loc": ["body", *where], "msg": message, "type": kind}])


@dataclass(slots=True)
class Imported:
    """One conversation to import: its messages parents first, with parents named by
    their index in ``said``."""

    source: str
    title: str
    created_at: datetime
    updated_at: datetime
    model: str | None = None
    system_prompt: str | None = None
    said: list[ImportedMessage] = field(default_factory=list)
    current: int | None = None  # index in ``said`` of the current branch's last message
    same_as: str | None = None  # a Parley conversation id it was exported from


@dataclass(slots=True)
class ImportedMessage:
    parent: int | None
    role: Literal["user", "assistant"]
    content: str
    created_at: datetime
    status: str = "complete"
    error: str | None = None


ImportText = Annotated[StrictStr, Field(max_length=MAX_IMPORTED_CHARS), StorableText]
# A time with or without an offset (without: UTC), that UTC can hold.
Moment = Annotated[datetime, Field(strict=False), AfterValidator(check_instant)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ParleyMessage(_Strict):
    id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]
    parent_id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)] | None = None
    role: Literal["user", "assistant"]
    content: ImportText
    status: Literal["complete", "stopped", "failed"] = "complete"
    error: Annotated[StrictStr, Field(max_length=10_000), StorableText] | None = None
    created_at: Moment


class ParleyConversation(_Strict):
    id: Annotated[StrictStr, Field(min_length=1, max_length=64), StorableText]
    title: Annotated[StrictStr, Field(max_length=10_000), StorableText] = ""
    created_at: Moment
    updated_at: Moment
    model: Annotated[StrictStr, Field(max_length=MODEL_NAME_MAX_CHARS), StorableText] | None = None
    system_prompt: ImportText | None = None
    current_message_id: StrictInt | None = None
    messages: list[ParleyMessage] = []


class ParleyDocument(_Strict):
    format: Literal["parley"]
    version: Literal[1]
    conversations: list[ParleyConversation]


class GptAuthor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr


class GptContent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content_type: StrictStr = "text"
    parts: list[Any] | None = None
    text: StrictStr | None = None


class GptMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    author: GptAuthor
    create_time: StrictFloat | None = None
    # Whom the message is for: "all" (the conversation), or a tool ("python", "browser").
    recipient: StrictStr | None = None
    content: GptContent | None = None
    metadata: dict[str, Any] | None = None


class GptNode(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message: GptMessage | None = None
    parent: StrictStr | None = None
    children: list[StrictStr] = []


class GptConversation(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    title: StrictStr | None = None
    create_time: StrictFloat | None = None
    update_time: StrictFloat | None = None
    mapping: dict[StrictStr, GptNode]
    current_node: StrictStr | None = None
    conversation_id: StrictStr | None = None
    id: StrictStr | None = None


_parley = TypeAdapter(ParleyDocument)
_chatgpt = TypeAdapter(list[GptConversation])


def read_import(body: bytes, *, max_prompt_chars: int, max_problems: int = 20) -> list[Imported]:
    """The conversations of an import file, checked throughout, or ``ImportRefused``
    naming what is wrong. (CPU-bound: callers run it off the event loop.)"""
    from pydantic import ValidationError

    body = body.removeprefix(b"\xef\xbb\xbf")  # a byte order mark, as some editors write
    start = body.lstrip()[:1]
    if start not in (b"{", b"["):
        raise _refused(
            (),
            "is not a Parley export (a JSON object) or ChatGPT's conversations.json (a JSON list)",
            "import_format",
        )
    try:
        if start == b"{":
            return _from_parley(_parley.validate_json(body), max_prompt_chars)
        return _from_chatgpt(_chatgpt.validate_json(body))
    except ValidationError as error:
        problems = []
        for problem in error.errors(include_url=False, include_input=False)[:max_problems]:
            message = problem["msg"]
            if problem["type"] == "json_invalid" and "escape" in message:
                message += " (a lone surrogate such as \\ud800 is not Unicode text)"
            where = [_short(part) for part in problem["loc"]]
            problems.append({"loc": ["body", *where], "msg": message, "type": problem["type"]})
        raise ImportRefused(problems) from None


def _short(part: str | int) -> str | int:
    # A file's keys name places in it, and may be of any length: an answer quotes a start.
    return part if isinstance(part, int) or len(part) <= 100 else part[:100] + "…"


def _title(text: str, said: list[ImportedMessage]) -> str:
    title = " ".join(text.split())
    if not title:
        first = next((m.content for m in said if m.role == "user"), "")
        title = _title_from(first) if first.strip() else ""
    if not title.isprintable():
        title = "".join(char for char in title if char.isprintable())
    return title[:TITLE_MAX_CHARS]


def _from_parley(document: ParleyDocument, max_prompt_chars: int) -> list[Imported]:
    out = []
    for i, item in enumerate(document.conversations):
        where = ("conversations", i)
        prompt = item.system_prompt
        if prompt is not None and len(prompt) > max_prompt_chars:
            raise _refused(
                (*where, "system_prompt"),
                f"is longer than {max_prompt_chars} characters (PARLEY_MAX_MESSAGE_CHARS)",
            )
        index: dict[int, int] = {}
        said: list[ImportedMessage] = []
        for j, message in enumerate(item.messages):
            if message.id in index:
                raise _refused((*where, "messages", j, "id"), "repeats an earlier message's id")
            parent = None
            if message.parent_id is not None:
                parent = index.get(message.parent_id)
                if parent is None:
                    raise _refused(
                        (*where, "messages", j, "parent_id"),
                        "names no earlier message of this conversation",
                    )
            # The shape every conversation has: a reply answers a user message, and a
            # user message begins the conversation or follows a reply.
            above = None if parent is None else said[parent].role
            if message.role == "assistant" and above != "user":
                raise _refused(
                    (*where, "messages", j, "parent_id"), "a reply must answer a user message"
                )
            if message.role == "user" and above == "user":
                raise _refused(
                    (*where, "messages", j, "parent_id"),
                    "a user message must begin the conversation or follow a reply",
                )
            index[message.id] = len(said)
            said.append(
                ImportedMessage(
                    parent=parent,
                    role=message.role,
                    content=message.content,
                    created_at=message.created_at,
                    status=message.status,
                    error=message.error,
                )
            )
        current = None
        if item.current_message_id is not None:
            current = index.get(item.current_message_id)
            if current is None:
                raise _refused(
                    (*where, "current_message_id"), "names no message of this conversation"
                )
        out.append(
            Imported(
                source="parley:" + item.id,
                same_as=item.id,
                title=_title(item.title, said),
                created_at=item.created_at,
                updated_at=item.updated_at,
                model=item.model or None,
                system_prompt=prompt if prompt and prompt.strip() else None,
                said=said,
                current=current,
            )
        )
    return out


def _epoch(value: float | None, fallback: datetime, location: tuple[Any, ...]) -> datetime:
    if value is None:
        return fallback
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise _refused(location, "is not a time (seconds since 1970)") from None


def _gpt_text(message: GptMessage, location: tuple[Any, ...]) -> str:
    content = message.content
    if content is None:
        return ""
    if content.parts is None:
        text = content.text or ""
    else:
        pieces = [part for part in content.parts if isinstance(part, str)]
        text = "\n\n".join(piece for piece in pieces if piece)
        if not text and len(pieces) < len(content.parts):
            text = "[an attachment that was not imported]"
    try:
        check_text(text)
    except ValueError as error:
        raise _refused((*location, "content"), str(error)) from None
    if len(text) > MAX_IMPORTED_CHARS:
        raise _refused((*location, "content"), f"is longer than {MAX_IMPORTED_CHARS} characters")
    return text


def _from_chatgpt(found: list[GptConversation]) -> list[Imported]:
    out = []
    now = datetime.now(UTC)
    for i, item in enumerate(found):
        where: tuple[Any, ...] = (i,)
        created = _epoch(item.create_time, now, (*where, "create_time"))
        updated = _epoch(item.update_time, created, (*where, "update_time"))
        said, current = _gpt_tree(item, where, created)
        name = item.conversation_id or item.id
        if name is None:  # an export without ids: the conversation itself names it
            canonical = json.dumps(item.model_dump(mode="json"), sort_keys=True)
            name = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
        source = "chatgpt:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:64]
        try:
            title = _title(check_text(item.title or ""), said)
        except ValueError as error:
            raise _refused((*where, "title"), str(error)) from None
        out.append(
            Imported(
                source=source,
                title=title,
                created_at=created,
                updated_at=updated,
                said=said,
                current=current,
            )
        )
    return out


def _gpt_tree(
    item: GptConversation, where: tuple[Any, ...], created: datetime
) -> tuple[list[ImportedMessage], int | None]:
    """A ChatGPT conversation's messages as a tree of user messages and replies, shaped as
    Parley's are: a reply answers a user message, a user message follows a reply.

    Left out: system and tool messages, hidden ones, what the model sent a tool (code it
    ran, a search), and a reply with no user message above it. The children of a message
    left out continue from the nearest message kept above it. Messages of one side in a
    row (a reply in parts, around a tool's output) are joined into one; where such a
    message has several continuations, each becomes a version of the whole.
    """
    mapping = item.mapping
    for node_id, node in mapping.items():
        if node.parent is not None and node.parent not in mapping:
            raise _refused((*where, "mapping", node_id, "parent"), "names no node of mapping")
    children: dict[str | None, list[str]] = {}
    for node_id, node in mapping.items():
        children.setdefault(node.parent, []).append(node_id)
    # Parents before children, siblings in time order; a node on a cycle is never reached.
    order: list[str] = []
    stack = list(reversed(_by_time(children.get(None, []), mapping)))
    while stack:
        node_id = stack.pop()
        order.append(node_id)
        stack.extend(reversed(_by_time(children.get(node_id, []), mapping)))
    if len(order) < len(mapping):
        reached = set(order)
        lost = next(n for n in mapping if n not in reached)
        raise _refused((*where, "mapping", lost, "parent"), "makes a cycle of parents")

    kept: dict[str, str] = {}  # node: the text of its message
    for node_id in order:
        message = mapping[node_id].message
        if message is None or message.author.role not in ("user", "assistant"):
            continue
        metadata = message.metadata or {}
        content_type = message.content.content_type if message.content else ""
        if (
            metadata.get("is_visually_hidden_from_conversation")
            or message.recipient not in (None, "all")
            or content_type not in ("text", "multimodal_text")
        ):
            continue
        text = _gpt_text(message, (*where, "mapping", node_id, "message"))
        if text.strip():
            kept[node_id] = text
    # Each node's nearest kept message above it, and how many kept messages follow each.
    nearest: dict[str, str | None] = {}
    follow_count: dict[str, int] = {}
    for node_id in order:
        parent = mapping[node_id].parent
        above = None if parent is None else (parent if parent in kept else nearest[parent])
        nearest[node_id] = above
        if node_id in kept and above is not None:
            follow_count[above] = follow_count.get(above, 0) + 1

    said: list[ImportedMessage] = []
    parts: list[list[str]] = []  # each message's texts, joined at the end
    index: dict[str, int | None] = {}  # a kept node: its message (None: left out)
    versions: dict[int, int] = {}  # a message: how many versions its endings made
    for node_id in order:
        if node_id not in kept:
            continue
        message = mapping[node_id].message
        assert message is not None
        role: Literal["user", "assistant"] = (
            "user" if message.author.role == "user" else "assistant"
        )
        text = kept[node_id]
        above = nearest[node_id]
        at = index[above] if above is not None else None
        if at is not None and said[at].role == role:
            if follow_count[above or ""] == 1:  # the next part of the same message
                parts[at].append(text)
                index[node_id] = at
                continue
            # One of several ways the message went on: a version of it, whole.
            index[node_id] = len(said)
            said.append(replace(said[at], content=""))
            parts.append([*parts[at], text])
            versions[at] = versions.get(at, 0) + 1
            continue
        if role == "assistant" and at is None:
            index[node_id] = None  # a reply to no message of the user's
            continue
        moment = _epoch(
            message.create_time, created, (*where, "mapping", node_id, "message", "create_time")
        )
        index[node_id] = len(said)
        said.append(ImportedMessage(parent=at, role=role, content="", created_at=moment))
        parts.append([text])
    # A message whose every ending became a version of it is only those versions.
    gone = {at for at, count in versions.items() if count == follow_count[_node_of(index, at)]}
    if gone:
        renumbered: dict[int, int] = {}
        for at in range(len(said)):
            if at not in gone:
                renumbered[at] = len(renumbered)
        for message in said:
            if message.parent is not None:
                message.parent = renumbered[message.parent]
        for node_id, at in index.items():
            if at in gone:
                # Its own node now stands for its first version.
                at = next(i for i, m in enumerate(said) if i not in gone and i > at)
            index[node_id] = None if at is None else renumbered[at]
        said = [m for at, m in enumerate(said) if at not in gone]
        parts = [p for at, p in enumerate(parts) if at not in gone]
    for message, pieces in zip(said, parts, strict=True):
        message.content = "\n\n".join(pieces)
        if len(message.content) > MAX_IMPORTED_CHARS:
            raise _refused(
                (*where, "mapping"),
                f"joins messages into one longer than {MAX_IMPORTED_CHARS} characters",
            )
    current = None
    node: str | None = item.current_node if item.current_node in mapping else None
    while node is not None and index.get(node) is None:
        node = nearest.get(node)
    if node is not None:
        current = index[node]
    return said, current


def _node_of(index: dict[str, int | None], at: int) -> str:
    """The last node joined into message ``at`` (the one its endings follow)."""
    return [node_id for node_id, i in index.items() if i == at][-1]


def _by_time(node_ids: list[str], mapping: dict[str, GptNode]) -> list[str]:
    def when(node_id: str) -> float:
        message = mapping[node_id].message
        return message.create_time if message and message.create_time is not None else 0.0

    return sorted(node_ids, key=when)


# --- Writing imports ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportResult:
    created: list[str]
    skipped: int


async def write_import(
    engine: AsyncEngine,
    owner: str,
    found: list[Imported],
    *,
    models: Iterable[str],
    account: bool,
) -> ImportResult:
    """Store the conversations of an import as ``owner``'s, in one transaction; those
    imported before (or, from Parley, that ``owner`` still has) are skipped.

    A few statements whatever the file's size: the conversations in one insert, their
    messages in another (each sent in batches by the driver), their current branches in
    one update. Conversations go in in the order of their sources, so that two imports
    of overlapping files wait for each other instead of deadlocking.
    """
    known_models = set(models)
    async with engine.begin() as conn:
        had_ids: set[str] = set()
        had_sources: set[str] = set()
        mine = sa.select(conversations.c.id, conversations.c.imported_from).where(
            conversations.c.owner == owner
        )
        for row in await conn.execute(mine):
            had_ids.add(row.id)
            if row.imported_from is not None:
                had_sources.add(row.imported_from)
        todo: dict[str, tuple[str, Imported]] = {}  # source: the new id, the conversation
        for item in sorted(found, key=lambda item: item.source):
            if item.source in had_sources or item.same_as in had_ids or item.source in todo:
                continue
            todo[item.source] = (str(uuid.uuid4()), item)
        created: list[str] = []
        if todo:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            rows = [
                {
                    "id": conversation_id,
                    "owner": owner,
                    "title": item.title,
                    "created_at": item.created_at,
                    "updated_at": item.updated_at,
                    "model": item.model if item.model in known_models else None,
                    "system_prompt": item.system_prompt,
                    "imported_from": source,
                }
                for source, (conversation_id, item) in todo.items()
            ]
            # A conversation that an import running at the same time stored first is
            # not returned: that one is kept, and this one skipped.
            statement = (
                insert(conversations)
                .on_conflict_do_nothing(index_elements=["owner", "imported_from"])
                .returning(conversations.c.id)
            )
            stored = set((await conn.execute(statement, rows)).scalars())
            chosen = [(cid, item) for cid, item in todo.values() if cid in stored]
            created = [cid for cid, _ in chosen]
            await _write_messages(conn, chosen)
        if account:
            await check_account(conn, owner)
    return ImportResult(created, len(found) - len(created))


async def _message_ids(conn: AsyncConnection, count: int) -> list[int]:
    """``count`` new message ids, ascending."""
    if conn.dialect.name == "postgresql":
        query = sa.text(
            "SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, :n)"
        )
        return sorted((await conn.execute(query, {"n": count})).scalars())
    # The transaction holds SQLite's write lock since it inserted the conversations.
    last = (await conn.scalar(sa.select(sa.func.max(messages.c.id)))) or 0
    return list(range(last + 1, last + 1 + count))


async def _write_messages(conn: AsyncConnection, chosen: list[tuple[str, Imported]]) -> None:
    total = sum(len(item.said) for _, item in chosen)
    if not total:
        return
    ids = iter(await _message_ids(conn, total))
    rows: list[dict[str, Any]] = []
    branches: list[dict[str, Any]] = []
    for conversation_id, item in chosen:
        said = item.said
        if not said:
            continue
        own = [next(ids) for _ in said]
        turn_of: list[str] = []
        answered: set[int] = set()
        newest_below: dict[int, int] = {}
        followers: dict[int | None, int] = {}
        for i, message in enumerate(said):
            parent = message.parent
            followers[parent] = followers.get(parent, 0) + 1
            if parent is not None:
                newest_below[parent] = i
            # A reply shares its user message's turn id (as a turn's two messages do),
            # unless another reply to it did already: a regenerated reply is a turn of
            # its own.
            if message.role == "assistant" and parent is not None and parent not in answered:
                answered.add(parent)
                turn_of.append(turn_of[parent])
            else:
                turn_of.append(f"import-{uuid.uuid4()}")
            rows.append(
                {
                    "id": own[i],
                    "conversation_id": conversation_id,
                    "turn_id": turn_of[i],
                    "role": message.role,
                    "content": message.content,
                    "status": message.status,
                    "error": message.error,
                    "created_at": message.created_at,
                    "parent_id": None if parent is None else own[parent],
                }
            )
        branched = any(count > 1 for count in followers.values())
        # The current branch, continued down to its newest message as switching does.
        at = item.current if item.current is not None else len(said) - 1
        while branched and at in newest_below:
            at = newest_below[at]
        leaf = own[at] if branched else own[-1]
        branches.append({"b_id": conversation_id, "b_leaf": leaf, "b_branched": branched})
    await conn.execute(messages.insert(), rows)
    await conn.execute(
        conversations.update()
        .where(conversations.c.id == sa.bindparam("b_id"))
        .values(leaf_id=sa.bindparam("b_leaf"), branched=sa.bindparam("b_branched")),
        branches,
    )
