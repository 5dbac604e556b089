"""Issue 7, the `openai` agent: a real gateway whose workers stream from the fake server in this process."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.client import Client
from tests.conftest import run
from tests.fake_openai import FakeOpenAI, free_port, split_tokens

KEY = "sk-test-0123456789"
REPLY = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def fake():
    with FakeOpenAI(reply=REPLY, api_key=KEY) as server:
        yield server


def key_file(tmp: Path, mode: int = 0o600) -> Path:
    path = tmp / "openai.key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    return path


def openai_gateway(factory, tmp: Path, base_url: str, timeout: float, mode: int = 0o600):
    return factory("--agent", "openai", "--openai-base-url", base_url, "--openai-model", "fake-model",
                   "--openai-api-key-file", str(key_file(tmp, mode)), "--openai-timeout", str(timeout))


async def turn(c: Client, sid: str, text: str, timeout: float = 15) -> tuple[dict, list[dict]]:
    """Run one prompt; returns message.complete's payload and every event of the turn."""
    start = len(c.by_session[sid])
    done = await c.turn(sid, text, timeout)
    return done["payload"], c.by_session[sid][start:]


def texts(events: list[dict], kind: str) -> list[str]:
    return [e["payload"].get("text", "") for e in events if e["type"] == kind]


def test_prompt_streams_the_fake_reply_with_usage_and_history(gateway_factory, tmp_dirs, fake):
    fake.reasoning = "thinking it over"
    gw = openai_gateway(gateway_factory, tmp_dirs, fake.base_url, 30)

    async def go():
        c = await Client.open(gw.url)
        status = await c.call("setup.status", {})
        assert status["provider_configured"] is True and status["agent"] == "openai"
        sid = await c.create()
        done, evs = await turn(c, sid, "hello there")
        assert done["status"] == "complete" and done["text"] == REPLY
        assert texts(evs, "message.delta") == split_tokens(REPLY)  # one delta per streamed chunk
        assert "".join(texts(evs, "reasoning.delta")) == "thinking it over"
        assert done["usage"] == {"input": 2, "output": len(split_tokens(REPLY)),
                                 "total": 2 + len(split_tokens(REPLY))}
        assert not [e for e in evs if e["type"] == "error"]
        first = fake.last()
        assert first.headers["authorization"] == f"Bearer {KEY}"
        assert first.body["model"] == "fake-model" and first.body["stream"] is True
        assert first.body["stream_options"] == {"include_usage": True}

        fake.reasoning = ""
        done, _ = await turn(c, sid, "and again")
        assert done["status"] == "complete" and done["text"] == REPLY
        assert fake.last().messages == [{"role": "user", "content": "hello there"},
                                        {"role": "assistant", "content": REPLY},
                                        {"role": "user", "content": "and again"}]
        usage = await c.call("session.usage", {"session_id": sid})
        assert usage["turns"] == 2 and usage["output"] == 2 * len(split_tokens(REPLY))
        info = await c.call("session.info", {"session_id": sid})
        assert info["agent"] == "openai" and info["model"] == "fake-model"
        await c.close()

    run(go())


def test_interrupt_closes_the_stream_even_when_the_server_stalls(gateway_factory, tmp_dirs, fake):
    # a 30 s read timeout: only the interrupt itself can end a stalled turn within the waits below
    gw = openai_gateway(gateway_factory, tmp_dirs, fake.base_url, 30)
    long_reply = " ".join(f"word{i}" for i in range(40))

    async def interrupted(c: Client, sid: str, text: str, started) -> tuple[dict, object]:
        start, seen = len(c.by_session[sid]), len(fake.requests)
        await c.call("prompt.submit", {"session_id": sid, "text": text})
        await c.wait_event(lambda e: e.get("session_id") == sid and started(e)
                           and c.by_session[sid].index(e) >= start, 10)
        deadline = time.monotonic() + 10
        while len(fake.requests) == seen and time.monotonic() < deadline:  # the server has the request
            await asyncio.sleep(0.01)
        record = fake.last()
        await c.call("session.interrupt", {"session_id": sid})
        done = await c.wait_event(lambda e: e.get("session_id") == sid and e["type"] == "message.complete"
                                  and c.by_session[sid].index(e) >= start, 5)
        return done["payload"], record

    first_delta = lambda e: e["type"] == "message.delta"  # noqa: E731

    async def go():
        c = await Client.open(gw.url)
        sid = await c.create()
        done, _ = await turn(c, sid, "warm the connection")
        assert done["status"] == "complete"
        n = len(fake.requests)
        # silent before the headers, on the kept-alive connection of the turn above
        done, rec = await interrupted(c, sid, "[fake:stall]", lambda e: e["type"] == "message.start")
        assert done["status"] == "interrupted"
        # streaming slowly, then silent mid-stream
        done, rec = await interrupted(c, sid, f"[fake:ok,delay=0.2,reply={long_reply}]", first_delta)
        assert done["status"] == "interrupted" and done["text"] and long_reply.startswith(done["text"])
        assert fake.wait_outcome(rec, 5) == "client-closed" and rec.sent_tokens < len(split_tokens(long_reply))
        done, rec = await interrupted(c, sid, "[fake:stall-mid]", first_delta)
        assert done["status"] == "interrupted" and done["text"] == split_tokens(REPLY)[0]
        assert fake.wait_outcome(rec, 5) == "client-closed"
        assert all(r.outcome == "client-closed" for r in fake.requests[n:]), [r.outcome for r in fake.requests]
        done, evs = await turn(c, sid, "still there?")
        assert done["status"] == "complete" and done["text"] == REPLY
        assert not [e for e in c.by_session[sid] if e["type"] == "error"]
        await c.close()

    run(go())


@pytest.mark.timeout(90)
def test_every_error_class_fails_the_turn_and_the_session_survives(gateway_factory, tmp_dirs):
    port = free_port()  # nothing listens yet: connection refused
    read_timeout = 3  # s: short, so the stalls end soon; not so short that a loaded machine trips a good turn
    gw = openai_gateway(gateway_factory, tmp_dirs, f"http://127.0.0.1:{port}/v1", read_timeout, mode=0o644)
    key = tmp_dirs / "openai.key"

    async def failed(c: Client, sid: str, text: str, *phrases: str) -> dict:
        done, evs = await turn(c, sid, text)
        assert done["status"] == "error", (text, done)
        errors = [e["payload"]["message"] for e in evs if e["type"] == "error"]
        assert len(errors) == 1 and all(p in errors[0] for p in phrases), (text, errors)
        return done

    async def works(c: Client, sid: str) -> None:
        done, _ = await turn(c, sid, "are you there?")
        assert done["status"] == "complete" and done["text"] == REPLY, done

    async def go():
        c = await Client.open(gw.url)
        sid = await c.create()
        await failed(c, sid, "hi", str(key), "mode 0644", "chmod 600")
        os.chmod(key, 0o600)  # read again on every turn: no restart needed
        await failed(c, sid, "hi", "cannot connect", f"127.0.0.1:{port}", "connection refused")
        with FakeOpenAI(reply=REPLY, api_key=KEY, port=port) as fake:
            await works(c, sid)
            fake.api_key = "a-different-key"
            await failed(c, sid, "hi", "bad API key", "401")
            fake.api_key = KEY
            await works(c, sid)
            for directive, phrases in [
                ("429", ("rate limited", "429", "retry after 7 s")),
                ("500", ("server error", "500")),
                ("503", ("server error", "503 Service Unavailable")),
                ("stall", ("timed out", f"sent nothing for {read_timeout} s")),
                ("stall-mid", ("timed out", f"sent nothing for {read_timeout} s")),
                ("malformed", ("malformed stream", "not JSON")),
                ("drop", ("closed the connection before the reply finished",)),
            ]:
                t0 = time.monotonic()
                done = await failed(c, sid, f"[fake:{directive}]", *phrases)
                if directive in ("stall-mid", "malformed", "drop"):
                    assert done["text"] == split_tokens(REPLY)[0]  # the partial reply is kept
                if directive.startswith("stall"):
                    assert time.monotonic() - t0 < read_timeout + 10  # the read timeout, not a hang
                await works(c, sid)
        usage = await c.call("session.usage", {"session_id": sid})
        assert usage["turns"] == 5 + 7 * 2  # every turn, failed or not, ran on the one session
        await c.close()

    run(go(), timeout=80)


def test_key_sources_and_request_messages(tmp_path):
    """Pure functions, no process: where the key comes from, and what a request carries."""
    from worker.agents.openai import KeyFileError, OpenAIAgent, load_api_key

    env = {"OPENAI_API_KEY": "from-openai-env", "HERMES_GATEWAY_OPENAI_API_KEY": "from-gateway-env"}
    assert load_api_key("", env) == "from-gateway-env"
    assert load_api_key("", {"OPENAI_API_KEY": "from-openai-env"}) == "from-openai-env"
    assert load_api_key("", {}) is None
    path = key_file(tmp_path, 0o400)
    assert load_api_key(str(path), env) == KEY  # the file wins over the environment
    for mode, words in [(0o640, "chmod 600"), (0o604, "mode 0604")]:
        path.chmod(mode)
        with pytest.raises(KeyFileError, match=words):
            load_api_key(str(path), env)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(KeyFileError, match="empty"):
        load_api_key(str(path), env)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_api_key(str(tmp_path / "missing"), env)

    agent = OpenAIAgent("http://127.0.0.1:1/v1/", "m", system_prompt="Be brief.")
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
               {"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}]
    assert agent.messages("c", history) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "c"}]
    assert OpenAIAgent("", "m").config_problem() and OpenAIAgent("http://x/v1", "").config_problem()
