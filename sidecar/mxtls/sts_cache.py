"""MTA-STS policies kept for their max_age (RFC 8461 section 5.1), in memory and on disk, and
the look-up that fills them: TXT record, cache, fetch.

The on-disk store is an SQLite file of its own, ``<delivery.state_dir>/mta-sts.sqlite3``
(stdlib :mod:`sqlite3`): read once when the store is opened (start-up), written when a policy
is fetched (rare: once per domain and max_age or TXT id), the write in a worker thread. It
survives a restart, so an attacker who strips the TXT record or blocks HTTPS after one cannot
downgrade a known policy: a policy that has not expired stays in force whenever no new one
can be had (section 5.1).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from sidecar.config import Config, ConfigError, verifying_context
from sidecar.errors import RouteError, describe_error
from sidecar.mxtls.outcome import ResultType
from sidecar.mxtls.sts import StsLookup, StsPolicy, StsRecord, parse_policy, parse_txt_records
from sidecar.mxtls.sts_fetch import CONNECT_TIMEOUT, FETCH_TIMEOUT, StsFetcher, StsFetchError
from sidecar.mxtls.tlsrpt_store import not_writable
from sidecar.resolver import Resolver

log = logging.getLogger("sidecar.mta_sts")

STORE_FILE = "mta-sts.sqlite3"
# Most policies kept (in memory, and loaded from disk): the soonest to expire go first.
MAX_ENTRIES = 10_000
# Seconds a failed fetch of one (domain, id) is not tried again: each try may cost a
# delivery up to the fetch timeout. A new TXT id is tried at once.
FAILURE_HOLD = 300.0
# Seconds after which a policy in use is fetched again though its TXT id did not change
# (RFC 8461 section 10.2: refresh before expiry, so that an attacker who blocks HTTPS when it
# expires cannot make it lapse). Its max_age runs anew from the refresh.
REFRESH_AFTER = 86_400.0
# Seconds a TXT look-up may take (cut to the caller's budget).
TXT_TIMEOUT = 5.0
# Seconds a domain whose TXT answer held no usable record is not asked again (RFC 8461
# section 10.2 lets senders check less often; a cached policy still applies meanwhile).
NO_RECORD_HOLD = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL NOT NULL
)
"""


class StateDirError(Exception):
    """``delivery.state_dir`` cannot hold the store (the text says why)."""


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as kept: its TXT ``id``, the body as fetched, when (Unix times)."""

    domain: str
    id: str
    policy: StsPolicy
    body: str
    fetched: float
    expires: float


class StsStore:
    """Policies by domain: in memory, and (``path`` not ``None``) in the SQLite file ``path``.
    ``clock``: Unix time (seconds)."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._entries: dict[str, CachedPolicy] = {}
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        if path is not None:
            self._open(path)

    @classmethod
    def in_state_dir(cls, state_dir: str, clock: Callable[[], float] = time.time) -> StsStore:
        """The store under ``state_dir`` (created if missing), or :class:`StateDirError`."""
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = error.strerror or describe_error(error)
            raise StateDirError(f"cannot create {state_dir}: {why}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StateDirError(f"cannot use {state_dir}: {not_writable(directory)}")
        return cls(directory / STORE_FILE, clock)

    @classmethod
    def read_only(cls, state_dir: str, clock: Callable[[], float] = time.time) -> StsStore:
        """The policies kept under ``state_dir`` as of now, in memory only (never written):
        for ``sidecar route``, which may run as another user than the sidecar. Empty when
        there is no store or it cannot be read."""
        store = cls(None, clock)
        path = Path(state_dir) / STORE_FILE
        if not path.exists():
            return store
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)
            try:
                store._load(db)
            finally:
                db.close()
        except sqlite3.Error as error:
            log.debug("MTA-STS cache %s not read: %s", path, describe_error(error))
        return store

    def _open(self, path: Path) -> None:
        try:
            db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
            # WAL with synchronous=NORMAL: a commit is not fsynced (a crash of the host may
            # lose the last policies written: they are fetched again), so writing a fetched
            # policy costs the delivery waiting for it well under a millisecond.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.commit()
            self._load(db)
        except sqlite3.Error as error:
            raise StateDirError(f"cannot use {path}: {describe_error(error)}") from None
        self._db = db

    def _load(self, db: sqlite3.Connection) -> None:
        """Keep in memory the unexpired policies of ``db`` (the MAX_ENTRIES that last
        longest)."""
        rows = db.execute(
            "SELECT domain, id, body, fetched, expires FROM policy WHERE expires > ?"
            " ORDER BY expires DESC LIMIT ?",
            (self.clock(), MAX_ENTRIES),
        ).fetchall()
        for domain, policy_id, body, fetched, expires in rows:
            try:
                policy = parse_policy(str(body).encode())
            except ValueError:
                continue  # not ours to trust any more: fetched anew when needed
            self._entries[domain] = CachedPolicy(domain, policy_id, policy, body, fetched, expires)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, domain: str) -> CachedPolicy | None:
        """The unexpired policy of ``domain``, or ``None``."""
        entry = self._entries.get(domain)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[domain]
            return None
        return entry

    def put_memory(self, entry: CachedPolicy) -> None:
        """Keep ``entry`` in memory (the soonest to expire goes when full)."""
        if entry.domain not in self._entries and len(self._entries) >= MAX_ENTRIES:
            oldest = min(self._entries.values(), key=lambda e: e.expires)
            del self._entries[oldest.domain]
        self._entries[entry.domain] = entry

    def write(self, entry: CachedPolicy) -> None:
        """Write ``entry`` to disk (blocking: call it in a thread), which keeps at most
        :data:`MAX_ENTRIES` policies, those that last longest (as memory does). Never raises:
        a failed write is logged, the policy stays in memory."""
        if self._db is None:
            return
        try:
            with self._db_lock, self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO policy (domain, id, body, fetched, expires)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (entry.domain, entry.id, entry.body, entry.fetched, entry.expires),
                )
                self._db.execute("DELETE FROM policy WHERE expires <= ?", (self.clock(),))
                # As in memory: at most MAX_ENTRIES, the ones that last longest.
                self._db.execute(
                    "DELETE FROM policy WHERE domain NOT IN"
                    " (SELECT domain FROM policy ORDER BY expires DESC LIMIT ?)",
                    (MAX_ENTRIES,),
                )
        except sqlite3.Error as error:
            log.warning("MTA-STS cache %s: cannot write: %s", self.path, describe_error(error))

    async def put(self, entry: CachedPolicy) -> None:
        """Keep ``entry`` in memory and write it to disk (off the trio thread)."""
        self.put_memory(entry)
        if self._db is not None:
            await trio.to_thread.run_sync(self.write, entry)

    def close(self) -> None:
        if self._db is not None:
            with self._db_lock:
                self._db.close()
            self._db = None


def _lookup(
    entry: CachedPolicy, problem: str | None = None, result: ResultType | None = None
) -> StsLookup:
    return StsLookup(
        entry.domain,
        entry.policy,
        entry.id,
        "cache",
        entry.expires,
        problem,
        result,
        entry.policy.lines(),
    )


class MtaSts:
    """The MTA-STS look-up of RFC 8461 section 5.1 for a recipient domain: the
    ``_mta-sts`` TXT record, the cached policy, a fetch when the record's id is new (one at a
    time per domain; a failure held for :data:`FAILURE_HOLD`)."""

    def __init__(self, resolver: Resolver, fetcher: StsFetcher, store: StsStore) -> None:
        self.resolver = resolver
        self.fetcher = fetcher
        self.store = store
        self._failures: dict[str, tuple[float, str, ResultType]] = {}
        self._fetching: dict[str, trio.Event] = {}
        self._no_record: dict[str, float] = {}  # domain -> trio time to ask again

    async def _record(self, domain: str, by: float) -> StsRecord | None:
        """The domain's TXT record; ``None`` when absent, invalid or not to be had. An
        answer without a usable record is taken as final for NO_RECORD_HOLD seconds: most
        domains publish none, and a negative answer without an SOA is not cached by the
        resolver (each RCPT would ask again)."""
        now = trio.current_time()
        if self._no_record.get(domain, 0.0) > now:
            return None
        with trio.move_on_at(min(now + TXT_TIMEOUT, by)):
            try:
                record = parse_txt_records(await self.resolver.resolve_txt(f"_mta-sts.{domain}"))
            except RouteError as error:
                log.debug("MTA-STS TXT of %s: %s", domain, error.reply.text)
                return None
            if record is None:
                if len(self._no_record) >= MAX_ENTRIES:
                    self._no_record = {d: t for d, t in self._no_record.items() if t > now}
                    if len(self._no_record) >= MAX_ENTRIES:
                        self._no_record.pop(next(iter(self._no_record)))
                self._no_record[domain] = now + NO_RECORD_HOLD
            else:
                self._no_record.pop(domain, None)
            return record
        log.debug("MTA-STS TXT of %s: timed out", domain)
        return None

    async def lookup(self, domain: str, *, by: float = math.inf) -> StsLookup:
        """The policy in force for ``domain`` (lower-case, no trailing dot), found by the
        absolute trio time ``by``: a fetched one, a cached one, or none."""
        record = await self._record(domain, by)
        cached = self.store.get(domain)
        if record is None:
            # No (valid) record, or DNS failed: a known policy stays (section 5.1).
            return _lookup(cached) if cached is not None else StsLookup(domain)
        # Same id and less than a day old: in force. Older: fetched again, so that a policy
        # in use does not lapse at its max_age (RFC 8461 section 10.2); a failure keeps it.
        if cached is not None and self._current(cached, record):
            return _lookup(cached)
        while (event := self._fetching.get(domain)) is not None:
            await event.wait()  # another session is fetching it: take its result
            cached = self.store.get(domain)
            if cached is not None and self._current(cached, record):
                return _lookup(cached)
        # Held per domain, whatever the id: TXT records with a new id each time (forged, or a
        # flapping zone) must not make every delivery wait for another failing fetch.
        held = self._failures.get(domain)
        now = trio.current_time()
        if held is not None and held[0] > now:
            return self._failed(domain, record, cached, held[1], held[2])
        event = self._fetching[domain] = trio.Event()
        try:
            fetched = await self.fetcher.fetch(domain, by=by)
        except StsFetchError as error:
            self._hold(domain, str(error), error.result)
            return self._failed(domain, record, cached, str(error), error.result)
        finally:
            del self._fetching[domain]
            event.set()
        self._failures.pop(domain, None)
        wall = self.store.clock()
        entry = CachedPolicy(
            domain, record.id, fetched.policy, fetched.text, wall, wall + fetched.policy.max_age
        )
        log.info(
            "MTA-STS policy of %s fetched: id %s, mode %s, max_age %d, mx %s",
            domain,
            record.id,
            fetched.policy.mode,
            fetched.policy.max_age,
            " ".join(fetched.policy.mx) or "-",
        )
        await self.store.put(entry)
        return StsLookup(
            domain,
            fetched.policy,
            record.id,
            "fetched",
            entry.expires,
            text=fetched.policy.lines(),
        )

    def _current(self, cached: CachedPolicy, record: StsRecord) -> bool:
        """``cached`` is the policy ``record`` announces, fetched less than REFRESH_AFTER
        ago."""
        return cached.id == record.id and self.store.clock() - cached.fetched < REFRESH_AFTER

    def _hold(self, domain: str, problem: str, result: ResultType) -> None:
        if len(self._failures) >= MAX_ENTRIES:
            now = trio.current_time()
            self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
            if len(self._failures) >= MAX_ENTRIES:
                self._failures.pop(next(iter(self._failures)))
        self._failures[domain] = (trio.current_time() + FAILURE_HOLD, problem, result)

    def _failed(
        self,
        domain: str,
        record: StsRecord,
        cached: CachedPolicy | None,
        problem: str,
        result: ResultType,
    ) -> StsLookup:
        """A fetch failed: the cached policy if there is one (section 5.1), else none."""
        if cached is not None:
            log.warning(
                "MTA-STS policy of %s (id %s) not fetched, the cached one (id %s) stays: %s",
                domain,
                record.id,
                cached.id,
                problem,
            )
            return _lookup(cached, problem, result)
        log.warning("MTA-STS policy of %s (id %s) not fetched: %s", domain, record.id, problem)
        return StsLookup(domain, id=record.id, problem=problem, result=result)


def sts_configured(config: Config) -> bool:
    """Whether MTA-STS may apply to any domain: ``delivery.mta_sts``, or ``mta_sts = true``
    in a domain table (top level, binding or binding_group)."""
    if config.delivery.mta_sts:
        return True
    scopes = [config.domains]
    scopes += [binding.domains for binding in config.bindings.values()]
    scopes += [group.domains for group in config.binding_groups.values()]
    return any(policy.mta_sts for scope in scopes for policy in scope.values())


def open_store(config: Config) -> StsStore:
    """The on-disk store under ``delivery.state_dir`` (created if missing), or
    :class:`ConfigError` naming ``delivery.state_dir`` (start-up, ``sidecar check``)."""
    try:
        return StsStore.in_state_dir(config.delivery.state_dir)
    except StateDirError as error:
        raise ConfigError("delivery.state_dir", f"{error} (MTA-STS policy cache)") from None


def build_mta_sts(
    config: Config,
    resolver: Resolver,
    store: StsStore | None = None,
) -> MtaSts | None:
    """The MTA-STS look-up for ``config`` (``None`` when no domain can have MTA-STS), over
    ``store`` (default: :func:`open_store`, which may raise :class:`ConfigError`). Its fetch
    context trusts what ``tls = "verify"`` trusts (``delivery.tls_ca_file`` or the system's
    store), in a context of its own (see :mod:`sidecar.mxtls.sts_fetch`)."""
    if not sts_configured(config):
        return None
    delivery = config.delivery
    if store is None:
        store = open_store(config)
    fetch_timeout = min(FETCH_TIMEOUT, delivery.setup_timeout / 4)
    fetcher = StsFetcher(
        resolver,
        verifying_context(delivery.tls_ca_file),
        allow_private=delivery.allow_private_destinations,
        connect_timeout=min(CONNECT_TIMEOUT, fetch_timeout),
        fetch_timeout=fetch_timeout,
    )
    return MtaSts(resolver, fetcher, store)
