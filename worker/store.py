"""The embedded session store: one SQLite file in WAL mode, written by the worker that owns a session.

Many worker processes share the file. Each opens its own connection with a busy
timeout, and writes in short transactions, so under contention a writer waits
instead of failing. The schema is versioned by `PRAGMA user_version` and migrated
forward on open; docs/persistence.md describes it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

BUSY_TIMEOUT_MS = 30_000
QUICK_CHECK_BUDGET_S = 5.0  # the lobby's start check; a store too large to check in this time is not checked
OPEN_TIMEOUT_S = 10.0  # how long opening retries a locked file before reporting it (workers must say hello)
CORRUPT_HINT = ("; the file is left as it is: move it aside to start an empty store, or restore a backup"
                " (see docs/persistence.md)")

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE sessions (
        key           TEXT PRIMARY KEY,
        title         TEXT,
        model         TEXT,
        source        TEXT,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        ended_at      REAL,
        end_reason    TEXT,
        message_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX sessions_title ON sessions(title) WHERE title IS NOT NULL;
    CREATE INDEX sessions_updated ON sessions(updated_at);
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL REFERENCES sessions(key) ON DELETE CASCADE,
        role        TEXT NOT NULL,
        text        TEXT NOT NULL DEFAULT '',
        status      TEXT,
        tool_id     TEXT,
        tool_name   TEXT,
        tool_args   TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX messages_session ON messages(session_key, id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The store cannot be used; the message says precisely why."""


@dataclass(slots=True)
class StoredSession:
    key: str
    title: str | None
    model: str | None
    source: str | None
    created_at: float
    updated_at: float
    ended_at: float | None
    end_reason: str | None
    message_count: int
    preview: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "session_key": self.key,
            "title": self.title or "",
            "model": self.model or "",
            "source": self.source or "",
            "started_at": self.created_at,
            "last_active": self.updated_at,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
            "message_count": self.message_count,
            "preview": self.preview,
        }


def default_path(data_dir: str) -> str:
    return os.path.join(data_dir, "sessions.db")


class Store:
    """A connection to the session database, safe to share between the threads of one worker."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                self._discard()
                # switching a new file to WAL takes an exclusive lock that SQLite does not
                # wait for; many workers opening at once see "locked" and simply try again
                locked = "locked" in str(exc) or "busy" in str(exc)
                if not locked:
                    raise StoreError(_describe(path, exc)) from None
                if time.monotonic() > deadline:
                    raise StoreError(f"{path}: {exc} (still locked after {OPEN_TIMEOUT_S:g} s:"
                                     " another process holds a lock on it)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except sqlite3.DatabaseError as exc:
                self._discard()
                raise StoreError(_describe(path, exc)) from None
            except OSError as exc:
                self._discard()
                raise StoreError(f"{path}: {exc.strerror or exc}") from None
            except StoreError:
                self._discard()
                raise

    def _discard(self) -> None:
        """Close a half-opened connection, so a failed open leaves no descriptor behind."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _open(self) -> None:
        path = self.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        private_files(path)  # SQLite gives the WAL and SHM the database file's mode
        # opening waits at most OPEN_TIMEOUT_S for a lock (a file some other tool holds is reported,
        # not waited on for the whole write timeout); writes afterwards wait BUSY_TIMEOUT_MS
        self._db = sqlite3.connect(path, timeout=OPEN_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={int(OPEN_TIMEOUT_S * 1000)}")
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: could not switch to WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    # -- schema -------------------------------------------------------------
    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this build ({SCHEMA_VERSION})")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if self._db.execute("PRAGMA user_version").fetchone()[0] >= target:
                        self._db.execute("COMMIT")  # another worker migrated first
                        continue
                    for stmt in MIGRATIONS[target - 1].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version={target}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.DatabaseError as exc:
                raise StoreError(_describe(self.path, exc)) from None

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(_describe(self.path, exc)) from None

    def check(self) -> None:
        """Raise StoreError unless the database answers a real query."""
        self._read("SELECT count(*) FROM sessions")

    def quick_check(self, budget: float = QUICK_CHECK_BUDGET_S) -> bool:
        """PRAGMA quick_check, abandoned after `budget` s; raise StoreError naming what is damaged.

        A page zeroed in the middle of the file still answers `check()`; only reading every page
        finds it. False when the budget ran out (the store was not checked, and is used as before).
        """
        deadline = time.monotonic() + budget
        with self._lock:
            self._db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
            try:
                rows = [r[0] for r in self._db.execute("PRAGMA quick_check(20)").fetchall()]
            except sqlite3.OperationalError as exc:
                if "interrupted" in str(exc):
                    return False
                raise StoreError(f"{self.path}: damaged (PRAGMA quick_check: {exc})" + CORRUPT_HINT) from None
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: damaged (PRAGMA quick_check: {exc})" + CORRUPT_HINT) from None
            finally:
                self._db.set_progress_handler(None, 0)
        if rows != ["ok"]:
            raise StoreError(f"{self.path}: damaged (PRAGMA quick_check: {'; '.join(map(str, rows[:3]))})"
                             + CORRUPT_HINT)
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions -----------------------------------------------------------
    def create_session(self, key: str, model: str = "", source: str = "tui") -> None:
        now = time.time()
        self._write("INSERT INTO sessions(key, model, source, created_at, updated_at) VALUES (?,?,?,?,?)",
                    (key, model, source, now, now))

    def get(self, key: str) -> StoredSession | None:
        rows = self._read(_SESSION_SELECT + " WHERE s.key = ?", (key,))
        return _session(rows[0]) if rows else None

    def find(self, key_or_title: str) -> StoredSession | None:
        """A stored key, or an exact title."""
        found = self.get(key_or_title)
        if found is None:
            rows = self._read(_SESSION_SELECT + " WHERE s.title = ?", (key_or_title,))
            found = _session(rows[0]) if rows else None
        return found

    def list(self, limit: int = 20) -> list[StoredSession]:
        rows = self._read(_SESSION_SELECT + " ORDER BY s.updated_at DESC, s.created_at DESC LIMIT ?", (limit,))
        return [_session(r) for r in rows]

    def set_title(self, key: str, title: str) -> str:
        """Set a title unique enough to resume by: a clash gets a numeric suffix."""
        base, n = title.strip()[:200], 1
        candidate = base
        while True:
            try:
                self._write("UPDATE sessions SET title = ?, updated_at = ? WHERE key = ?", (candidate, time.time(), key))
                return candidate
            except StoreError as exc:
                if "UNIQUE" not in str(exc):
                    raise
                n += 1
                candidate = f"{base} #{n}"

    def set_model(self, key: str, model: str) -> None:
        self._write("UPDATE sessions SET model = ? WHERE key = ?", (model, key))

    def end(self, key: str, reason: str) -> None:
        self._write("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE key = ?", (time.time(), reason, key))

    def end_if_open(self, key: str, reason: str, at: float) -> bool:
        """Record the end of a session whose worker could not (killed): only if no end is recorded yet
        and nothing touched the row after `at` (a resume that re-opened it meanwhile wins)."""
        cur = self._write("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE key = ? AND ended_at IS NULL"
                          " AND updated_at <= ?", (at, reason, key, at))
        return cur.rowcount > 0

    def reopen(self, key: str) -> None:
        self._write("UPDATE sessions SET ended_at = NULL, end_reason = NULL, updated_at = ? WHERE key = ?",
                    (time.time(), key))

    # -- messages -----------------------------------------------------------
    def add_message(self, key: str, role: str, text: str, status: str | None = None,
                    tool_id: str | None = None, tool_name: str | None = None, tool_args: str | None = None) -> int:
        now = time.time()
        with self._lock:
            self._write("BEGIN IMMEDIATE")
            try:
                cur = self._write(
                    "INSERT INTO messages(session_key, role, text, status, tool_id, tool_name, tool_args, created_at,"
                    " updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (key, role, text, status, tool_id, tool_name, tool_args, now, now))
                self._write("UPDATE sessions SET message_count = message_count + 1, updated_at = ? WHERE key = ?",
                            (now, key))
                self._write("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return int(cur.lastrowid)

    def update_message(self, msg_id: int, text: str, status: str | None) -> None:
        self._write("UPDATE messages SET text = ?, status = ?, updated_at = ? WHERE id = ?",
                    (text, status, time.time(), msg_id))

    def delete_messages(self, ids: list[int], key: str) -> None:
        if not ids:
            return
        with self._lock:
            self._write("BEGIN IMMEDIATE")
            try:
                self._write(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
                self._write("UPDATE sessions SET message_count = (SELECT count(*) FROM messages WHERE session_key = ?),"
                            " updated_at = ? WHERE key = ?", (key, time.time(), key))
                self._write("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def messages(self, key: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT id, role, text, status, tool_id, tool_name, tool_args, created_at FROM messages"
                          " WHERE session_key = ? ORDER BY id", (key,))
        return [dict(r) for r in rows]

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass


_SESSION_SELECT = (
    "SELECT s.*, (SELECT substr(m.text, 1, 80) FROM messages m WHERE m.session_key = s.key AND m.role = 'user'"
    " ORDER BY m.id LIMIT 1) AS preview FROM sessions s"
)


def private_files(path: str) -> None:
    """Create the database file 0600 whatever the umask, and take group/other access off an existing one
    and its WAL/SHM: the store holds every conversation."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except IsADirectoryError:
        return  # reported by SQLite, naming the file
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(name, stat.S_IMODE(st.st_mode) & 0o700)


def _describe(path: str, exc: sqlite3.Error) -> str:
    """The path and SQLite's own words, plus what to do when the file itself is damaged."""
    text = str(exc)
    hint = CORRUPT_HINT if "not a database" in text or "malformed" in text else ""
    return f"{path}: {text}{hint}"


def _session(row: sqlite3.Row) -> StoredSession:
    return StoredSession(
        key=row["key"], title=row["title"], model=row["model"], source=row["source"],
        created_at=row["created_at"], updated_at=row["updated_at"], ended_at=row["ended_at"],
        end_reason=row["end_reason"], message_count=row["message_count"], preview=row["preview"] or "",
    )
