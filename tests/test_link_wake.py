"""The worker link's wake-up: a frame posted by another thread never waits for the main loop's poll timeout."""

from __future__ import annotations

import select

import pytest

from worker.link import Link


@pytest.fixture
def link(worker_link):
    return worker_link[0]


def _woken(link: Link) -> bool:
    """What the main loop's poll would see: the wake pipe is readable."""
    return bool(select.select([link._wake_r], [], [], 0)[0])


def test_a_post_racing_the_flush_leaves_the_next_post_a_wake(link, monkeypatch):
    """A turn thread posts an event just as the main loop flushes (between its clearing of the wake flag and the
    rest of the flush); the next event, posted after the flush, must still find the main loop woken."""
    link.post_event(1, "message.delta", b"{}")
    real = link._poked.clear
    raced = []

    def clear_then_post() -> None:
        real()
        if not raced:  # the racing post, at the worst moment: right after the flag was cleared
            raced.append(True)
            link.post_event(2, "message.delta", b"{}")

    monkeypatch.setattr(link._poked, "clear", clear_then_post)
    link._flush()
    assert raced
    link.post_event(3, "message.complete", b"{}")
    assert _woken(link), "the main loop would sleep until its poll timeout with an event queued"


def test_every_post_after_a_flush_wakes_the_main_loop(link):
    link._flush()
    assert not _woken(link)
    link.post(b"x")
    assert _woken(link)
