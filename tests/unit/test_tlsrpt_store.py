"""sidecar.mxtls.tlsrpt_store: outcomes counted in memory per day, policy domain, policy and
failure detail; written in batches off the trio thread (and at the end of ``run``); several
writers share one file; an unusable state_dir is an error naming delivery.state_dir."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import date
from pathlib import Path

import pytest
import trio

from sidecar.mxtls import tlsrpt_store
from sidecar.mxtls.outcome import TlsOutcome
from sidecar.mxtls.tlsrpt import Tally
from sidecar.mxtls.tlsrpt_store import StateDirError, TlsRptStore, store_path

DAY = date(2026, 11, 29)


def outcome(result: str | None = None, **fields: object) -> TlsOutcome:
    values: dict[str, object] = {
        "policy_domain": "example.test",
        "policy_type": "no-policy-found",
        "mx_host": "mx1.example.test",
        "receiving_ip": "198.51.100.25",
        "sending_ip": "192.0.2.1",
        "result": result,
        "detail": "" if result is None else f"{result} here",
    }
    values.update(fields)
    return TlsOutcome(**values)  # type: ignore[arg-type]


def open_store(tmp_path: Path, day: date = DAY) -> TlsRptStore:
    return TlsRptStore.open(str(tmp_path / "state"), today=lambda: day)


def test_outcomes_are_aggregated_per_day_domain_policy_and_failure(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for _ in range(3):
        store.record(outcome())
    store.record(outcome(receiving_ip="198.51.100.26"))  # a success keeps no details
    store.record(outcome("certificate-expired"))
    store.record(outcome("certificate-expired"))
    store.record(outcome("certificate-expired", sending_ip="192.0.2.2"))
    store.record(outcome("starttls-not-supported", sending_ip=None))
    store.record(outcome(policy_domain="Other.TEST"))
    assert store.pending == 9
    store.flush_now()
    assert store.pending == 0
    assert store.domains(DAY) == ["example.test", "other.test"]
    assert store.domains(date(2026, 11, 28)) == []
    tallies = sorted(
        store.tallies(DAY, "example.test"), key=lambda t: (t.result or "", t.sending_ip)
    )
    assert tallies == [
        Tally("no-policy-found", (), (), None, "", "", "", "", 4),
        Tally(
            "no-policy-found", (), (), "certificate-expired", "192.0.2.1", "mx1.example.test",
            "198.51.100.25", "certificate-expired here", 2,
        ),
        Tally(
            "no-policy-found", (), (), "certificate-expired", "192.0.2.2", "mx1.example.test",
            "198.51.100.25", "certificate-expired here", 1,
        ),
        Tally(
            "no-policy-found", (), (), "starttls-not-supported", "", "mx1.example.test",
            "198.51.100.25", "starttls-not-supported here", 1,
        ),
    ]  # fmt: skip


def test_policy_strings_and_mx_hosts_are_kept(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    sts = ("version: STSv1", "mode: enforce", "mx: mx1.example.test", "mx: *.example.test")
    store.record(outcome(policy_type="sts", policy_strings=sts))
    store.record(outcome(policy_type="tlsa", policy_strings=("3 1 1 abcd",)))
    store.flush_now()
    tallies = {t.policy_type: t for t in store.tallies(DAY, "example.test")}
    assert tallies["sts"].policy_strings == sts
    assert tallies["sts"].mx_hosts == ("mx1.example.test", "*.example.test")
    assert tallies["tlsa"].mx_hosts == ("mx1.example.test",)


def test_writes_add_to_what_is_stored(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.record(outcome())
    store.flush_now()
    store.record(outcome())
    store.record(outcome())
    store.flush_now()
    again = open_store(tmp_path)  # another process, a restart: same file
    again.record(outcome())
    again.flush_now()
    (tally,) = store.tallies(DAY, "example.test")
    assert tally.count == 4


def test_days_are_utc_days_of_the_record_and_old_ones_are_pruned(tmp_path: Path) -> None:
    today = [date(2026, 11, 28)]
    store = TlsRptStore.open(str(tmp_path / "state"), today=lambda: today[0])
    store.record(outcome())
    today[0] = DAY
    store.record(outcome())
    store.record(outcome())
    store.flush_now()
    assert [t.count for t in store.tallies(date(2026, 11, 28), "example.test")] == [1]
    assert [t.count for t in store.tallies(DAY, "example.test")] == [2]
    assert store.prune(DAY) == 1
    assert store.domains(date(2026, 11, 28)) == []
    assert store.domains(DAY) == ["example.test"]


def test_record_never_raises_and_the_memory_it_takes_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsrpt_store, "MAX_PENDING_KEYS", 3)
    store = open_store(tmp_path)
    for index in range(10):
        store.record(outcome("validation-failure", detail=f"reason {index}"))
    store.record(outcome("validation-failure", detail="reason 0"))  # a known row still counts
    assert store.pending == 4 and store.dropped == 7
    broken = TlsRptStore(tmp_path / "x", today=lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    broken.record(outcome())  # logged, not raised


def test_long_fields_are_cut(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.record(outcome("validation-failure", detail="x" * 5000, mx_host="m" * 400))
    store.flush_now()
    (tally,) = store.tallies(DAY, "example.test")
    assert len(tally.reason) == 200 and tally.reason.endswith("...")
    assert len(tally.receiving_mx) == 255


async def test_flush_writes_in_a_thread_and_keeps_the_counts_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.record(outcome())
    real_write = store._write

    def failing_write(batch: dict[tlsrpt_store.Key, int]) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_write", failing_write)
    await store.flush()
    assert store.pending == 1  # kept for the next write
    store.record(outcome())
    monkeypatch.setattr(store, "_write", real_write)
    await store.flush()
    assert store.pending == 0
    (tally,) = store.tallies(DAY, "example.test")
    assert tally.count == 2


async def test_run_writes_periodically_and_once_more_when_cancelled(tmp_path: Path) -> None:
    store = open_store(tmp_path)

    def counts() -> list[int]:
        return [t.count for t in store.tallies(DAY, "example.test")]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run, 0.05)
        store.record(outcome())
        with trio.fail_after(5):
            while counts() != [1]:
                await trio.sleep(0.01)
        store.record(outcome())
        store.record(outcome())
        nursery.cancel_scope.cancel()  # a shutdown, before the next write: it comes now
    assert store.pending == 0
    assert counts() == [3]


def _writer(state_dir: str, rounds: int) -> None:
    store = TlsRptStore.open(state_dir, today=lambda: DAY)
    for _ in range(rounds):
        for _ in range(10):
            store.record(outcome())
        store.record(outcome("certificate-expired"))
        store.flush_now()


def test_two_writer_processes_share_the_file(tmp_path: Path) -> None:
    state_dir = str(tmp_path / "state")
    TlsRptStore.open(state_dir)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(state_dir, 50)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    store = TlsRptStore.open(state_dir)
    counts = {t.result: t.count for t in store.tallies(DAY, "example.test")}
    assert counts == {None: 1000, "certificate-expired": 100}
    with sqlite3.connect(store_path(state_dir)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_state_dir_that_cannot_hold_the_store_is_an_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateDirError, match=r"^delivery\.state_dir: cannot keep .*file/sub"):
        TlsRptStore.open(str(blocker / "sub"))


def test_the_directory_is_made_when_missing(tmp_path: Path) -> None:
    store = TlsRptStore.open(str(tmp_path / "a" / "b"))
    assert store.path == tmp_path / "a" / "b" / "tls-rpt.sqlite3"
    assert store.path.exists()
