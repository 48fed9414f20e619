"""The TLS-RPT results store (RFC 8460): counts of TLS session attempts per UTC day, policy
domain, policy and (for failures) result type, sending IP, receiving MX host and IP and
reason, in ``<delivery.state_dir>/tls-rpt.sqlite3`` (stdlib sqlite3).

:meth:`TlsRptStore.record` is called on the delivery path: it only adds to counts in memory
(bounded: :data:`MAX_PENDING_KEYS`). :meth:`TlsRptStore.run`, a task of the server's nursery,
writes them every :data:`FLUSH_INTERVAL` seconds in a worker thread, and once more when it
is cancelled (at the end of a shutdown): what was recorded is not lost on SIGTERM. Several
processes (``server.workers``) share the file: WAL journal, a busy timeout, and writes that
add to the stored counts (``count = count + excluded.count``). ``sidecar tls-report`` reads
it (:meth:`TlsRptStore.domains`, :meth:`TlsRptStore.tallies`) and prunes old days.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import cast

import trio

from sidecar.errors import describe_error
from sidecar.mxtls.outcome import PolicyType, ResultType, TlsOutcome
from sidecar.mxtls.tlsrpt import MAX_REASON_CHARS, SUCCESS, Tally

log = logging.getLogger("sidecar.tlsrpt")

STORE_FILE = "tls-rpt.sqlite3"
FLUSH_INTERVAL = 5.0  # seconds between writes of the counts
BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's (server.workers)
FINAL_FLUSH_TIMEOUT = 15.0  # seconds the last write at shutdown may take
# Distinct rows kept in memory between two writes; an outcome that would add one more is
# dropped (and counted, and logged at the next write). A write every few seconds makes this
# far more than a busy sidecar fills.
MAX_PENDING_KEYS = 10_000
MAX_FIELD_CHARS = 255  # a host name, an address, one policy string
MAX_POLICY_STRINGS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tlsrpt_sessions (
    day TEXT NOT NULL,              -- UTC day, YYYY-MM-DD
    policy_domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,      -- tlsa | sts | no-policy-found
    policy_strings TEXT NOT NULL,   -- JSON array of strings
    mx_hosts TEXT NOT NULL,         -- JSON array of strings (the report's mx-host)
    result TEXT NOT NULL,           -- '' for a successful session, else the result type
    sending_ip TEXT NOT NULL,       -- '' for successes and bypass (direct) deliveries
    receiving_mx TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_strings, mx_hosts, result,
                 sending_ip, receiving_mx, receiving_ip, reason)
) WITHOUT ROWID
"""

_UPSERT = """
INSERT INTO tlsrpt_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, policy_domain, policy_type, policy_strings, mx_hosts, result,
             sending_ip, receiving_mx, receiving_ip, reason)
DO UPDATE SET count = count + excluded.count
"""

# (day, policy domain, policy type, policy strings, mx hosts, result, sending IP,
# receiving MX, receiving IP, reason): one row of the table without its count.
Key = tuple[str, str, str, str, str, str, str, str, str, str]


class StateDirError(Exception):
    """``delivery.state_dir`` cannot hold the store (not creatable, not writable)."""


def store_path(state_dir: str) -> Path:
    """Where the store of ``delivery.state_dir`` lives."""
    return Path(state_dir) / STORE_FILE


def state_dir_problem(state_dir: str) -> str | None:
    """Why ``sidecar run`` could not keep its store under ``state_dir``, as the user asking,
    without creating anything (``sidecar check``); ``None`` when it could."""
    path = store_path(state_dir)
    directory = path.parent
    where = f"delivery.state_dir: cannot keep the TLS-RPT results in {str(path)!r}"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(directory, os.W_OK):
            return f"{where}: {not_writable(directory)}"
        why = unreadable_store(path)
        return None if why is None else f"{where}: {why}"
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{where}: {str(existing)!r} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}: {not_writable(existing)}"
    return None


def not_writable(path: Path) -> str:
    """Why the existing ``path`` cannot be written: "Read-only file system" when it is on a
    read-only mount (a container's read-only root without a volume: a writable volume
    helps, not chown), else "Permission denied"."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "Read-only file system"
    except OSError:
        pass
    return "Permission denied"


def unreadable_store(path: Path) -> str | None:
    """Why the existing SQLite file ``path`` (a store under ``delivery.state_dir``) cannot
    be read as a database, e.g. "file is not a database" after a disk fault or a stray file;
    ``None`` when it can. Opened read-only: nothing is created or changed (``sidecar
    check``), so that check refuses what ``sidecar run`` would refuse."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
        ) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as error:
        return describe_error(error)
    return None


def _clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mx_hosts(outcome: TlsOutcome) -> tuple[str, ...]:
    """The report's mx-host of ``outcome``'s policy: the MX host for DANE (its TLSA records
    are that host's), the policy's ``mx:`` patterns for MTA-STS, none without a policy."""
    if outcome.policy_type == "tlsa":
        return (outcome.mx_host,)
    if outcome.policy_type == "sts":
        return tuple(
            line.split(":", 1)[1].strip()
            for line in outcome.policy_strings
            if line.split(":", 1)[0].strip() == "mx" and ":" in line
        )
    return ()


def key_of(outcome: TlsOutcome, day: date) -> Key:
    """The row ``outcome`` counts in, on ``day``. A success keeps only the policy: the
    report has no details of successful sessions."""
    strings = json.dumps([_clip(s) for s in outcome.policy_strings[:MAX_POLICY_STRINGS]])
    hosts = json.dumps([_clip(h) for h in _mx_hosts(outcome)[:MAX_POLICY_STRINGS]])
    policy = (day.isoformat(), _clip(outcome.policy_domain.lower()), outcome.policy_type)
    if outcome.result is None:
        return (*policy, strings, hosts, SUCCESS, "", "", "", "")
    return (
        *policy,
        strings,
        hosts,
        outcome.result,
        _clip(outcome.sending_ip or ""),
        _clip(outcome.mx_host.lower()),
        _clip(outcome.receiving_ip),
        _clip(outcome.detail or outcome.result, MAX_REASON_CHARS),
    )


def _utc_today() -> date:
    return datetime.now(UTC).date()


class TlsRptStore:
    """The results store (a :class:`sidecar.mxtls.outcome.TlsReporter`). Make it with
    :meth:`open`, which raises :class:`StateDirError` naming ``delivery.state_dir``."""

    def __init__(self, path: Path, today: Callable[[], date] = _utc_today) -> None:
        self.path = path
        self._today = today
        self._pending: dict[Key, int] = {}
        self._flushing = trio.Lock()
        self.dropped = 0  # outcomes not counted since the last write (MAX_PENDING_KEYS)
        self._write_failed = False

    @classmethod
    def open(cls, state_dir: str, today: Callable[[], date] = _utc_today) -> TlsRptStore:
        """The store under ``state_dir`` (the directory and the file made if missing, the
        table too); :class:`StateDirError` when that cannot be done."""
        path = store_path(state_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(_connect(path)) as db:
                db.execute(_SCHEMA)
                db.commit()
            if not os.access(path, os.R_OK | os.W_OK):
                raise PermissionError(f"{path}: not readable and writable")
        except (OSError, sqlite3.Error) as error:
            raise StateDirError(
                f"delivery.state_dir: cannot keep the TLS-RPT results in {str(path)!r}: "
                f"{describe_error(error)}"
            ) from None
        return cls(path, today)

    # ---- the delivery path ------------------------------------------------------------------

    def record(self, outcome: TlsOutcome) -> None:
        """Count ``outcome`` (in memory; written by the next flush). Never blocks, never
        raises."""
        try:
            key = key_of(outcome, self._today())
            count = self._pending.get(key)
            if count is not None:
                self._pending[key] = count + 1
            elif len(self._pending) < MAX_PENDING_KEYS:
                self._pending[key] = 1
            else:
                self.dropped += 1
        except Exception:  # a reporting fault must never fail a delivery
            log.exception("TLS-RPT: cannot record an outcome")

    @property
    def pending(self) -> int:
        """Sessions counted in memory and not written yet."""
        return sum(self._pending.values())

    # ---- writing ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what was counted since the last write (in a worker thread). A write that
        fails keeps the counts for the next one, and is logged (once until one succeeds)."""
        async with self._flushing:
            batch, self._pending = self._pending, {}
            dropped, self.dropped = self.dropped, 0
            if dropped:
                log.warning(
                    "TLS-RPT: %d session outcomes were not counted: more than %d distinct"
                    " rows between two writes",
                    dropped,
                    MAX_PENDING_KEYS,
                )
            if not batch:
                return
            try:
                await trio.to_thread.run_sync(self._write, batch)
            except (OSError, sqlite3.Error) as error:
                for key, count in batch.items():  # kept for the next write
                    if key in self._pending or len(self._pending) < MAX_PENDING_KEYS:
                        self._pending[key] = self._pending.get(key, 0) + count
                if not self._write_failed:
                    log.error(
                        "TLS-RPT: cannot write the results to %s (kept in memory, retried): %s",
                        self.path,
                        describe_error(error),
                    )
                self._write_failed = True
                return
            if self._write_failed:
                log.warning("TLS-RPT: writing the results to %s works again", self.path)
            self._write_failed = False

    def flush_now(self) -> None:
        """:meth:`flush` outside trio (the command line, tests)."""
        batch, self._pending = self._pending, {}
        if batch:
            self._write(batch)

    def _write(self, batch: dict[Key, int]) -> None:
        with contextlib.closing(_connect(self.path)) as db, db:
            db.executemany(_UPSERT, [(*key, count) for key, count in batch.items()])

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Write every ``interval`` seconds until cancelled, then once more (shielded, within
        FINAL_FLUSH_TIMEOUT): the server's nursery runs this, and cancels it last."""
        try:
            while True:
                await trio.sleep(interval)
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                await self.flush()
            if self._pending:
                log.error(
                    "TLS-RPT: %d session outcomes could not be written at shutdown",
                    self.pending,
                )

    # ---- reading (sidecar tls-report) -------------------------------------------------------

    def domains(self, day: date) -> list[str]:
        """The policy domains with sessions recorded on ``day``, sorted."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT DISTINCT policy_domain FROM tlsrpt_sessions WHERE day = ?"
                " ORDER BY policy_domain",
                (day.isoformat(),),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def tallies(self, day: date, policy_domain: str) -> list[Tally]:
        """The counts of ``policy_domain`` on ``day``."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT policy_type, policy_strings, mx_hosts, result, sending_ip,"
                " receiving_mx, receiving_ip, reason, count FROM tlsrpt_sessions"
                " WHERE day = ? AND policy_domain = ?",
                (day.isoformat(), policy_domain),
            ).fetchall()
        return [
            Tally(
                policy_type=cast(PolicyType, row[0]),
                policy_strings=tuple(json.loads(row[1])),
                mx_hosts=tuple(json.loads(row[2])),
                result=cast(ResultType, row[3]) if row[3] != SUCCESS else None,
                sending_ip=row[4],
                receiving_mx=row[5],
                receiving_ip=row[6],
                reason=row[7],
                count=int(row[8]),
            )
            for row in rows
        ]

    def prune(self, before: date) -> int:
        """Forget the days before ``before``; how many rows went."""
        with contextlib.closing(_connect(self.path)) as db, db:
            cursor = db.execute("DELETE FROM tlsrpt_sessions WHERE day < ?", (before.isoformat(),))
            return cursor.rowcount

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with contextlib.closing(_connect(self.path)) as db:
            yield db


def _connect(path: Path) -> sqlite3.Connection:
    """A connection for one write or read: WAL (readers and the writer of another process do
    not wait for each other), and a busy timeout for two writers."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level="DEFERRED")
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    return db
