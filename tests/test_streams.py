"""A turn's live events, without a server: what each reader is sent, and when it ends."""

from __future__ import annotations

from parley.streams import START, Event, EventId, LiveTurn


def token(n: int, text: str) -> Event:
    return Event(EventId(1, n), "token", {"text": text})


DONE = Event(EventId(2, 0), "done", {})


async def test_a_reader_gets_the_end_event_published_while_it_was_sending() -> None:
    """The writer publishes the last events while a reader is still sending an earlier
    one (each event a reader sends is a wait on its socket): none of them may be lost."""
    live = LiveTurn("turn", first_epoch=1)
    live.publish(token(1, "a"))
    seen = []
    async for event in live.follow(START):
        seen.append(event)
        if event.id == EventId(1, 1):
            live.publish(token(2, "b"))
            live.publish(DONE)
    assert [(e.type, e.data) for e in seen] == [
        ("token", {"text": "a"}),
        ("token", {"text": "b"}),
        ("done", {}),
    ]


async def test_a_reader_past_the_end_gets_nothing_and_is_not_left_waiting() -> None:
    live = LiveTurn("turn", first_epoch=1)
    live.publish(token(1, "a"))
    live.publish(DONE)
    assert [event async for event in live.follow(DONE.id)] == []
    assert [event.type async for event in live.follow(EventId(1, 1))] == ["done"]
