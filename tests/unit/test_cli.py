"""sidecar.cli: ``check`` and ``init`` through click's CliRunner."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import load_config, parse_config
from sidecar.starter import STARTER_CONFIG

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sidecar.toml"

VALID = """
[server]
hostname = "mta1.example.com"

[[listener]]
address = "127.0.0.1:2525"
binding = "b1"

[binding.b1]
ha_proxy_server = "127.0.0.1:5000"
ha_proxy_src_addr = "192.0.2.10"
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp_path: Path, text: str, name: str = "sidecar.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- check -------------------------------------------------------------------------------------


def test_check_prints_effective_config_and_exits_0(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    effective = tomllib.loads(result.stdout)
    assert effective["server"]["hostname"] == "mta1.example.com"
    assert effective["server"]["max_connections"] == 1000
    assert effective["delivery"]["tls"] == "opportunistic"
    assert effective["ha_proxy_client"]["health_check_interval"] == 5.0
    assert effective["listener"] == [
        {"address": "127.0.0.1:2525", "binding": "b1", "protocol": "smtp", "max_routes": 20}
    ]
    assert parse_config(effective) == load_config(path)


def test_check_says_how_many_workers_auto_starts(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.config.schema.available_cpus", lambda: 3)
    path = write(tmp_path, VALID.replace('hostname = "mta1.example.com"', 'workers = "auto"'))
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["server"]["workers"] == "auto"
    assert 'note: workers = "auto" starts 3 worker process(es) here' in result.stderr


def test_check_long_option(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = runner.invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0


def test_check_invalid_config_exits_2_with_key_path(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace('"192.0.2.10"', '"1.2.3"'))
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == 'error: binding.b1.ha_proxy_src_addr: "1.2.3" is not an IPv4 address\n'


def test_check_unknown_key(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("hostname", "hostnme"))
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr == "error: server.hostnme: unknown key\n"


def test_check_toml_syntax_error_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: not valid TOML: ")


def test_check_missing_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: cannot read {path}: No such file or directory\n"


def test_check_reads_sidecar_config_env_var(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = runner.invoke(main, ["check"], env={"SIDECAR_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["binding"]["b1"]["ha_proxy_src_addr"] == "192.0.2.10"


def test_check_option_overrides_env_var(runner: CliRunner, tmp_path: Path) -> None:
    good = write(tmp_path, VALID)
    result = runner.invoke(
        main, ["check", "-c", str(good)], env={"SIDECAR_CONFIG": str(tmp_path / "absent.toml")}
    )
    assert result.exit_code == 0, result.output


def test_check_without_config_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check"], env={"SIDECAR_CONFIG": None})
    assert result.exit_code == 2
    assert "Missing option '-c' / '--config'" in result.stderr


# -- init --------------------------------------------------------------------------------------


def test_starter_config_is_the_example_file() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == STARTER_CONFIG


def test_init_writes_default_path_that_passes_check(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sidecar.toml").read_text(encoding="utf-8") == STARTER_CONFIG
    assert "sidecar.toml" in result.stderr

    check = runner.invoke(main, ["check", "-c", "sidecar.toml"])
    assert check.exit_code == 0, check.output
    assert tomllib.loads(check.stdout)["listener"] == [
        {"address": "127.0.0.1:2525", "binding": "b1", "protocol": "smtp", "max_routes": 20}
    ]


def test_init_writes_given_path(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    result = runner.invoke(main, ["init", str(path)])
    assert result.exit_code == 0, result.output
    assert path.read_text(encoding="utf-8") == STARTER_CONFIG
    load_config(path)


def test_init_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "# mine\n")
    result = runner.invoke(main, ["init", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"error: {path} already exists (use --force to overwrite it)\n"
    assert path.read_text(encoding="utf-8") == "# mine\n"


def test_init_force_overwrites(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "# mine\n")
    result = runner.invoke(main, ["init", "--force", str(path)])
    assert result.exit_code == 0, result.output
    assert path.read_text(encoding="utf-8") == STARTER_CONFIG


def test_init_dash_writes_to_stdout(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["init", "-"])
    assert result.exit_code == 0, result.output
    assert result.stdout == STARTER_CONFIG
    assert list(tmp_path.iterdir()) == []
    parse_config(tomllib.loads(result.stdout))


def test_init_unwritable_path_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["init", str(tmp_path / "no" / "such" / "dir.toml")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot write ")
    # The container's case (a read-only working directory): the way out is in the message.
    assert "sidecar init - > sidecar.toml" in result.stderr


# -- group -------------------------------------------------------------------------------------


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("sidecar, version ")


def test_help_lists_commands(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "check" in result.stdout
    assert "init" in result.stdout


# -- tls-report --------------------------------------------------------------------------------


def _tls_config(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    return write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{state}"\n')


def test_tls_report_refuses_a_bad_date(runner: CliRunner, tmp_path: Path) -> None:
    path = _tls_config(tmp_path)
    result = runner.invoke(main, ["tls-report", "-c", str(path), "--date", "29/11/2026"])
    assert result.exit_code == 2
    assert "error: --date 29/11/2026: not a date like 2026-01-31" in result.output


def test_tls_report_writes_the_reports_of_domains_that_publish_a_record(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip
    import json
    from datetime import UTC, datetime, timedelta

    from sidecar.mxtls.outcome import TlsOutcome
    from sidecar.mxtls.tlsrpt_store import TlsRptStore
    from sidecar.resolver import Resolver

    path = _tls_config(tmp_path)
    day = datetime.now(UTC).date() - timedelta(days=10)
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    store = TlsRptStore.open(str(tmp_path / "state"), today=lambda: day)
    for domain in ("a.test", "b.test"):
        store.record(TlsOutcome(domain, "no-policy-found", f"mx.{domain}", "192.0.2.25", None))
    store.flush_now()
    asked: list[str] = []

    async def resolve_txt(self: Resolver, name: str) -> tuple[str, ...]:
        asked.append(name)
        if name == "_smtp._tls.a.test":
            return ("v=TLSRPTv1; rua=https://r.a.test/x,mailto:r@a.test",)
        return ()

    monkeypatch.setattr(Resolver, "resolve_txt", resolve_txt)
    out = tmp_path / "out"
    args = ["tls-report", "-c", str(path), "--date", day.isoformat(), "--output-dir", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert asked == ["_smtp._tls.a.test", "_smtp._tls.b.test"]
    name = f"mta1.example.com!a.test!{start}!{start + 86399}"
    assert result.stdout.splitlines() == [
        f"https://r.a.test/x {out / name}.json.gz",
        f"mailto:r@a.test {out / name}.eml",
    ]
    assert f"{day}: 1 reports" in result.stderr
    assert "no TLS-RPT record: b.test" in result.stderr
    report = json.loads(gzip.decompress((out / f"{name}.json.gz").read_bytes()))
    assert report["contact-info"] == "postmaster@mta1.example.com"
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    # --keep-days prunes what is older (counted from today).
    result = runner.invoke(main, [*args, "--keep-days", "1"])
    assert result.exit_code == 0 and "old rows pruned" in result.stderr
    assert store.domains(day) == []


def test_check_refuses_a_state_dir_that_cannot_hold_the_store(
    runner: CliRunner, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    path = write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{blocker / "state"}"\n')
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: delivery.state_dir: cannot keep the TLS-RPT results in "
        f"'{blocker}/state/tls-rpt.sqlite3': '{blocker}' is not a directory\n"
    )
    assert not (tmp_path / "fresh").exists()
    path = write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{tmp_path / "fresh" / "s"}"\n')
    assert runner.invoke(main, ["check", "-c", str(path)]).exit_code == 0
    assert not (tmp_path / "fresh").exists()  # checked, not made


@pytest.mark.parametrize("name", ["tls-rpt.sqlite3", "mta-sts.sqlite3"])
def test_check_refuses_a_store_sidecar_run_could_not_open(
    runner: CliRunner, tmp_path: Path, name: str
) -> None:
    """A store file that is not an SQLite database (a crash, a disk fault, a stray file):
    ``sidecar run`` stops with ``error: delivery.state_dir: ... file is not a database``, so
    ``sidecar check`` must say the same and not pass it (a check that passes and a service
    that does not start is what a careful operator's deploy pipeline cannot catch)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(b"not a database " * 100)
    path = write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{state}"\n')
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: delivery.state_dir: ")
    assert f"{state / name}" in result.stderr and "file is not a database" in result.stderr
    assert (state / name).read_bytes() == b"not a database " * 100  # checked, not touched


def test_tls_report_names_the_option_of_an_output_dir_it_cannot_make(
    runner: CliRunner, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    path = write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{tmp_path / "state"}"\n')
    args = ["tls-report", "-c", str(path), "--output-dir", str(blocker / "out")]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --output-dir {blocker / 'out'}: "), result.stderr


def test_check_and_run_say_a_read_only_state_dir_is_read_only(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state_dir on a read-only mount (a container's read-only root without a volume) is
    not a permission problem: chown would not help, a writable volume would. Check and run
    say which."""
    import os
    import types

    from sidecar.mxtls.sts_cache import StateDirError, StsStore

    state = tmp_path / "state"
    state.mkdir()
    real_statvfs = os.statvfs
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: not (mode & os.W_OK) and os.path.exists(path)
    )
    monkeypatch.setattr(
        os,
        "statvfs",
        lambda path: types.SimpleNamespace(f_flag=real_statvfs(path).f_flag | os.ST_RDONLY),
    )
    path = write(tmp_path, VALID + f'\n[delivery]\nstate_dir = "{state}"\n')
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.stderr.endswith(": Read-only file system\n"), result.stderr
    with pytest.raises(StateDirError, match="Read-only file system"):
        StsStore.in_state_dir(str(state))


class _Answer:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> bytes:
        return self.body


@pytest.mark.parametrize(("here", "running"), [(1, 3), (4, 2)])
def test_control_reaches_the_workers_the_running_sidecar_has(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    here: int,
    running: int,
) -> None:
    """workers = "auto" resolved where the sidecar runs (its systemd CPUAffinity/CPUQuota,
    taskset) need not be what this command resolves: suspend goes to each worker the
    running sidecar says it has (worker 0's /status), not to the count resolved here
    (too few left workers delivering, too many failed against closed ports)."""
    monkeypatch.setattr("sidecar.config.schema.available_cpus", lambda: here)
    asked: list[str] = []

    def urlopen(url: str, timeout: float, data: bytes | None = None) -> _Answer:
        asked.append(f"{'POST' if data else 'GET'} {url}")
        if url.endswith("/status"):
            return _Answer(json.dumps({"workers": running, "worker": 0}).encode())
        port = int(url.split(":")[2].split("/")[0])
        if port >= 9925 + running:
            raise ConnectionRefusedError(111, "Connection refused")
        return _Answer(b'{"paths": []}')

    monkeypatch.setattr("sidecar.cli._urlopen", urlopen)
    text = VALID.replace('hostname = "mta1.example.com"', 'workers = "auto"')
    path = write(tmp_path, text + '\n[status]\naddress = "127.0.0.1:9925"\n')
    result = runner.invoke(
        main, ["suspend", "-c", str(path), "--binding", "b1", "--site", "x", "--duration", "1h"]
    )
    assert result.exit_code == 0, result.output
    posted = [url for url in asked if url.startswith("POST")]
    assert posted == [
        f"POST http://127.0.0.1:{9925 + i}/shaping/suspend" for i in range(running)
    ], asked


def test_control_without_an_answer_from_worker_0_uses_the_configured_count(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def urlopen(url: str, timeout: float, data: bytes | None = None) -> _Answer:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr("sidecar.cli._urlopen", urlopen)
    text = VALID.replace('hostname = "mta1.example.com"', "workers = 2")
    path = write(tmp_path, text + '\n[status]\naddress = "[::1]:9925"\n')
    result = runner.invoke(main, ["resume", "-c", str(path), "--binding", "b1", "--site", "x"])
    assert result.exit_code == 1
    assert "no answer from http://[::1]:9925/shaping/resume" in result.stderr
    assert "no answer from http://[::1]:9926/shaping/resume" in result.stderr
