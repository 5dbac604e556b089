"""worker/store.py on real SQLite files: migrations, sessions and messages, titles, listing, many writer processes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
import traceback

import pytest

from worker.store import SCHEMA_VERSION, Store, StoreError, default_path


@pytest.fixture
def db_path(tmp_path):
    return default_path(str(tmp_path / "data"))


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


def _raw(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# -- opening and migrations ---------------------------------------------------

def test_fresh_file_is_created_in_wal_mode_at_the_current_version(db_path):
    assert not os.path.exists(db_path)
    s = Store(db_path)
    s.check()
    s.close()
    assert os.path.exists(db_path)
    with _raw(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"sessions", "messages"} <= tables
    assert {"sessions_title", "sessions_updated", "messages_session"} <= indexes


def test_reopening_a_migrated_file_keeps_its_data_and_version(db_path):
    s = Store(db_path)
    s.create_session("20250101_000000_aaaaaa", model="m")
    s.add_message("20250101_000000_aaaaaa", "user", "kept")
    s.close()
    again = Store(db_path)
    try:
        assert [m["text"] for m in again.messages("20250101_000000_aaaaaa")] == ["kept"]
    finally:
        again.close()
    with _raw(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused_not_downgraded(db_path):
    Store(db_path).close()
    with _raw(db_path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=r"schema version \d+ is newer than this build"):
        Store(db_path)
    with _raw(db_path) as db:  # untouched
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_a_file_that_is_not_a_database_is_a_store_error_naming_the_file(db_path):
    os.makedirs(os.path.dirname(db_path))
    with open(db_path, "wb") as fh:
        fh.write(b"this is not a database\n" * 200)
    with pytest.raises(StoreError) as err:
        Store(db_path)
    assert db_path in str(err.value) and "not a database" in str(err.value)


def test_a_foreign_database_without_our_schema_is_a_store_error(db_path):
    os.makedirs(os.path.dirname(db_path))
    with _raw(db_path) as db:
        db.execute("CREATE TABLE sessions (something_else TEXT)")
    with pytest.raises(StoreError, match="already exists"):
        Store(db_path)


def test_a_directory_in_place_of_the_file_is_a_store_error(db_path):
    os.makedirs(db_path)
    with pytest.raises(StoreError, match="sessions.db"):
        Store(db_path)


# -- sessions and messages ----------------------------------------------------

def test_session_row_round_trip_and_end_reopen(store):
    key = "20250101_120000_abcdef"
    store.create_session(key, model="echo", source="tui")
    got = store.get(key)
    assert got is not None
    assert (got.key, got.model, got.source, got.message_count, got.ended_at, got.end_reason) == \
        (key, "echo", "tui", 0, None, None)
    assert got.created_at == pytest.approx(time.time(), abs=60)
    store.set_model(key, "other")
    store.end(key, "client_close")
    got = store.get(key)
    assert got.model == "other" and got.end_reason == "client_close" and got.ended_at >= got.created_at
    store.reopen(key)
    got = store.get(key)
    assert got.ended_at is None and got.end_reason is None
    assert store.get("20250101_120000_000000") is None


def test_end_if_open_records_only_an_open_untouched_row(store):
    key = "20250101_120000_aaaaaa"
    store.create_session(key)
    assert store.end_if_open(key, "worker_exit", time.time() + 1)
    assert store.get(key).end_reason == "worker_exit"
    assert not store.end_if_open(key, "heartbeat_lost", time.time() + 1)  # already ended: kept
    assert store.get(key).end_reason == "worker_exit"
    store.reopen(key)  # a resume after the death re-opened it
    assert not store.end_if_open(key, "worker_exit", time.time() - 5)
    assert store.get(key).ended_at is None


def test_messages_keep_order_fields_and_count(store):
    key = "20250101_120000_bbbbbb"
    store.create_session(key)
    a = store.add_message(key, "user", "hello")
    b = store.add_message(key, "assistant", "he", "streaming")
    store.update_message(b, "hello back", "complete")
    c = store.add_message(key, "tool", "", tool_id="t1", tool_name="grep", tool_args='{"q":"x"}')
    assert a < b < c
    rows = store.messages(key)
    assert [(r["id"], r["role"], r["text"], r["status"]) for r in rows] == [
        (a, "user", "hello", None), (b, "assistant", "hello back", "complete"), (c, "tool", "", None)]
    assert (rows[2]["tool_id"], rows[2]["tool_name"], rows[2]["tool_args"]) == ("t1", "grep", '{"q":"x"}')
    assert store.get(key).message_count == 3
    store.delete_messages([b, c], key)
    assert [r["id"] for r in store.messages(key)] == [a]
    assert store.get(key).message_count == 1
    store.delete_messages([], key)
    assert store.get(key).message_count == 1


def test_a_message_for_an_unknown_session_is_refused_and_leaves_nothing(store):
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_message("20250101_120000_nosuch", "user", "orphan")
    with _raw(store.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_set_title_makes_clashing_titles_unique(store):
    keys = [f"20250101_120000_00000{i}" for i in range(4)]
    for k in keys:
        store.create_session(k)
    assert store.set_title(keys[0], "  Plan  ") == "Plan"
    assert store.set_title(keys[1], "Plan") == "Plan #2"
    assert store.set_title(keys[2], "Plan") == "Plan #3"
    assert store.set_title(keys[0], "Plan") == "Plan"  # its own title is no clash
    assert store.set_title(keys[3], "x" * 500) == "x" * 200
    assert [store.get(k).title for k in keys] == ["Plan", "Plan #2", "Plan #3", "x" * 200]


def test_find_by_key_or_exact_title(store):
    store.create_session("20250101_120000_111111")
    store.create_session("20250101_120000_222222")
    store.set_title("20250101_120000_222222", "Refactor the parser")
    assert store.find("20250101_120000_111111").key == "20250101_120000_111111"
    assert store.find("Refactor the parser").key == "20250101_120000_222222"
    assert store.find("refactor the parser") is None  # exact only
    assert store.find("Refactor") is None
    assert store.find("nothing") is None


def test_list_is_newest_activity_first_with_preview_and_limit(store):
    keys = [f"20250101_12000{i}_cccccc" for i in range(3)]
    for k in keys:
        store.create_session(k)
        time.sleep(0.01)
    store.add_message(keys[0], "assistant", "not a preview")
    store.add_message(keys[0], "user", "first question " + "z" * 200)
    store.add_message(keys[0], "user", "second question")
    time.sleep(0.01)
    store.add_message(keys[1], "user", "middle")
    rows = store.list(10)
    assert [r.key for r in rows] == [keys[1], keys[0], keys[2]]
    assert rows[1].preview == ("first question " + "z" * 200)[:80]
    assert rows[2].preview == ""
    assert [r.message_count for r in rows] == [1, 3, 0]
    row = rows[1].row()
    assert row["session_key"] == row["id"] == keys[0]
    assert row["message_count"] == 3 and row["started_at"] == rows[1].created_at
    assert [r.key for r in store.list(1)] == [keys[1]]


def test_one_connection_is_safe_across_threads(store):
    import threading

    key = "20250101_120000_dddddd"
    store.create_session(key)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(50):
                store.add_message(key, "user", f"{n}:{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get(key).message_count == 200
    for n in range(4):
        mine = [m["text"] for m in store.messages(key) if m["text"].startswith(f"{n}:")]
        assert mine == [f"{n}:{i}" for i in range(50)]


# -- many processes, one file -------------------------------------------------

WRITERS = 8
TURNS = 100


def _writer(path: str, n: int, start: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    """What a session worker does: open, create its session, and stream turns (user row, partial, final)."""
    try:
        start.wait(30)
        s = Store(path)
        key = f"20250101_120000_{n:06x}"
        s.create_session(key)
        for t in range(TURNS):
            s.add_message(key, "user", f"u{t}")
            msg = s.add_message(key, "assistant", "", "streaming")
            for part in range(3):
                s.update_message(msg, f"a{t}" + "." * part, "streaming")
            s.update_message(msg, f"a{t}", "complete")
            s.list(5)  # a reader in the middle of it all (the lobby)
        s.close()
        out.put((n, "ok"))
    except BaseException:
        out.put((n, traceback.format_exc()))


def test_concurrent_writer_processes_never_see_database_is_locked(db_path):
    # each process opens the file itself (a fresh file: they also race the WAL switch and the migration)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(db_path, n, start, out)) for n in range(WRITERS)]
    for p in procs:
        p.start()
    try:
        start.set()
        results = dict(out.get(timeout=50) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    failed = {n: r for n, r in results.items() if r != "ok"}
    assert not failed, "\n".join(failed.values())
    s = Store(db_path)
    try:
        assert len(s.list(100)) == WRITERS
        for n in range(WRITERS):
            key = f"20250101_120000_{n:06x}"
            rows = s.messages(key)
            assert [(r["role"], r["text"], r["status"]) for r in rows] == [
                x for t in range(TURNS) for x in (("user", f"u{t}", None), ("assistant", f"a{t}", "complete"))]
            assert s.get(key).message_count == 2 * TURNS
    finally:
        s.close()


def test_a_damaged_file_is_reported_with_what_to_do(db_path):
    s = Store(db_path)
    for n in range(20):
        s.create_session(f"20250101_120000_{n:06x}")
        s.add_message(f"20250101_120000_{n:06x}", "user", "x" * 2000)
    s.close()  # the last connection checkpoints the WAL into the main file
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as fh:  # keep the header page, scribble over every other page
        fh.seek(4096)
        fh.write(b"\xa5" * (size - 4096))
    with pytest.raises(StoreError) as err:
        damaged = Store(db_path)
        damaged.check()
    assert db_path in str(err.value) and "malformed" in str(err.value)
    assert "move it aside" in str(err.value)


def test_a_file_locked_by_another_process_is_reported_not_waited_on_forever(db_path, monkeypatch):
    import worker.store as store_mod

    os.makedirs(os.path.dirname(db_path))
    holder = _raw(db_path)  # a rollback-journal file, exclusively locked (as by some other tool)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(store_mod, "OPEN_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError, match="locked"):
            Store(db_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert time.monotonic() - t0 < 20  # bounded by the open timeout, not by the 30 s busy timeout of writes
