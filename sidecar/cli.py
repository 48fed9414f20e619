"""Command line: ``sidecar run``, ``check``, ``init``, ``route``, ``probe``, ``status``,
``suspend`` and ``resume``.

Exit codes: 0 success, 1 an operational failure (e.g. ``init`` would overwrite a file),
2 a configuration or usage error.
"""

from __future__ import annotations

import signal
import sys

if sys.argv[1:2] == ["run"]:
    # `sidecar run` holds SIGTERM, SIGINT and SIGHUP from its first moment (before the imports
    # below, which take a few tenths of a second) until its handlers are in place: a SIGHUP
    # from logrotate or a deploy's reload right after a start must not kill it. Handled then
    # by run_until_signal (the same set as sidecar.server.hold_signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

import contextlib
import json
import logging
import os
import socket
import sqlite3
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from sidecar.config import MAX_WORKERS, Config, ConfigError, config_to_dict, load_config
from sidecar.errors import describe_error
from sidecar.explain import dane_resolver_warning, explain_route, status_reader
from sidecar.limits import expected_budget, raise_nofile_limit
from sidecar.logs import configure_logging, shutdown_logging
from sidecar.mxtls.tlsrpt_store import (
    StateDirError,
    TlsRptStore,
    state_dir_problem,
    unreadable_store,
)
from sidecar.server import ListenError, hold_signals, run_until_signal
from sidecar.smtp.commands import CommandError, parse_rcpt_to
from sidecar.starter import STARTER_CONFIG
from sidecar.status_view import render_table, snapshot_from_json
from sidecar.workers import supervise

CONFIG_ENVVAR = "SIDECAR_CONFIG"
ACCESS_DENIED_BANNER = b"554 5.7.1 "
DISTRIBUTION = "smtp-proxy-sidecar"
EXIT_CONFIG_ERROR = 2

_F = TypeVar("_F", bound=Callable[..., object])


def _urlopen(url: str, timeout: float, data: bytes | None = None) -> Any:
    # Imported here: urllib.request pulls in the email and http packages, RSS that a
    # running sidecar (which never makes an HTTP request) should not carry.
    import urllib.request

    if data is None:
        return urllib.request.urlopen(url, timeout=timeout)
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"content-type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def _get(url: str, timeout: float = 3) -> bytes:
    with _urlopen(url, timeout) as response:
        data: bytes = response.read()
        return data


def running_workers(config: Config, fetch: Callable[[str], bytes]) -> int:
    """How many workers the running sidecar has: the ``workers`` of worker 0's /status.

    Not ``server.workers`` as this command reads it: the sidecar resolved ``"auto"`` with its
    own affinity mask and cgroup (a systemd ``CPUAffinity=``/``CPUQuota=``, ``taskset``),
    which need not be this command's, and a changed ``workers`` applies only at a restart.
    The configuration's count when worker 0 does not answer (at least one)."""
    address = config.status.address
    if address is None:
        return 0
    try:
        count = json.loads(fetch(f"http://{_url_host(address.host)}:{address.port}/status"))[
            "workers"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return config.server.worker_count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return config.server.worker_count
    return min(count, MAX_WORKERS, 65536 - address.port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def status_urls(config: Config, path: str, workers: int | None = None) -> list[str]:
    """``path`` on the status endpoint of every worker (worker i serves on port + i) of
    ``workers`` (default: :func:`running_workers`); [] when [status] address is not set."""
    address = config.status.address
    if address is None:
        return []
    if workers is None:
        workers = running_workers(config, _get)
    host = _url_host(address.host)
    return [f"http://{host}:{address.port + index}{path}" for index in range(workers)]


def config_option(f: _F) -> _F:
    """``-c/--config FILE`` (or ``$SIDECAR_CONFIG``), passed as ``config_path``."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        envvar=CONFIG_ENVVAR,
        required=True,
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=str),
        help=f"Configuration file (TOML). Default: ${CONFIG_ENVVAR}.",
    )(f)


def _load(config_path: str, *, state: bool = False) -> Config:
    """Load and validate the configuration, or print ``error: ...`` and exit 2.

    What the loader warns about (deprecated key names) is printed as ``warning: ...`` on
    stderr: the log is not set up yet (``run``), or there is none (``check``).
    """
    config_log = logging.getLogger("sidecar.config")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    config_log.addHandler(handler)
    config_log.propagate = False
    try:
        config = load_config(config_path)
        if state:  # check and run: the state directory too (created if missing)
            check_state_dir(config)
        return config
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    finally:
        config_log.removeHandler(handler)
        config_log.propagate = True


def check_state_dir(config: Config) -> None:
    """With MTA-STS on for any domain, ``delivery.state_dir`` must hold its policy cache:
    created if missing, else :class:`ConfigError` naming the key (``check`` and ``run``)."""
    from sidecar.mxtls.sts_cache import open_store, sts_configured

    if sts_configured(config):
        open_store(config).close()


def sts_store_problem(config: Config) -> str | None:
    """Why ``sidecar run`` could not open the MTA-STS policy cache that exists under
    ``delivery.state_dir`` (e.g. "file is not a database"), read-only, as ``check`` may;
    ``None`` when it could, or there is none yet, or MTA-STS is off."""
    from sidecar.mxtls.sts_cache import STORE_FILE, sts_configured

    path = Path(config.delivery.state_dir) / STORE_FILE
    if not sts_configured(config) or not path.exists():
        return None
    why = unreadable_store(path)
    if why is None:
        return None
    return f"delivery.state_dir: cannot use {path}: {why} (MTA-STS policy cache)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# The version is looked up only when asked for: importlib.metadata costs ~1 MiB of RSS. The
# distribution is "smtp-proxy-sidecar" (the name "sidecar" on PyPI is another project's); the
# command and the package stay "sidecar".
@click.version_option(None, "-V", "--version", package_name=DISTRIBUTION, prog_name="sidecar")
def main() -> None:
    """Local SMTP-to-PROXY sidecar: delivers each message to its MX through an HAProxy egress
    with the binding's source address."""


@main.command()
@config_option
def check(config_path: str) -> None:
    """Validate the configuration and print the effective one (defaults filled in).

    Exits 0 when valid, 2 with "error: <key path>: <problem>" on stderr when not.
    """
    config = _load(config_path)
    problem = state_dir_problem(config.delivery.state_dir) or sts_store_problem(config)
    if problem is not None:
        click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    import tomli_w

    click.echo(tomli_w.dumps(config_to_dict(config)), nl=False)
    dane_warning = dane_resolver_warning(config)
    if dane_warning is not None:
        click.echo(f"warning: {dane_warning}", err=True)
    if config.server.workers == "auto":
        click.echo(
            f'note: workers = "auto" starts {config.server.worker_count} worker process(es) '
            "here (the CPUs this process may use)",
            err=True,
        )
    budget = expected_budget(config)
    if budget.reduced:
        click.echo(
            f"note: with this RLIMIT_NOFILE, max_connections {budget.max_connections} would be "
            f"reduced to {budget.sessions} per worker ({budget.describe()})",
            err=True,
        )


@main.command()
@click.argument("path", default="sidecar.toml", type=click.Path(dir_okay=False, path_type=str))
@click.option("-f", "--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: str, force: bool) -> None:
    """Write a commented starter configuration to PATH (default: sidecar.toml; "-": stdout)."""
    if path == "-":
        click.echo(STARTER_CONFIG, nl=False)
        return
    try:
        with open(path, "w" if force else "x", encoding="utf-8") as f:
            f.write(STARTER_CONFIG)
    except FileExistsError:
        click.echo(f"error: {path} already exists (use --force to overwrite it)", err=True)
        sys.exit(1)
    except OSError as e:
        # In a container the working directory is usually read-only: say how to get the file.
        click.echo(
            f"error: cannot write {path}: {e.strerror or describe_error(e)} (write the starter"
            " to stdout instead: sidecar init - > sidecar.toml)",
            err=True,
        )
        sys.exit(1)
    click.echo(f"wrote {path}; edit it, then run: sidecar check -c {os.fspath(path)}", err=True)


LOG_LEVELS = ("debug", "info", "warning", "error")


@main.command()
@config_option
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Log level.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text, or one JSON object per line for log shippers.",
)
def run(config_path: str, log_level: str, log_format: str) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP re-reads the configuration file."""
    hold_signals()  # handled once the sidecar is up, never fatal before
    config = _load(config_path, state=True)
    configure_logging(log_level, "json" if log_format == "json" else "text")
    dane_warning = dane_resolver_warning(config)
    if dane_warning is not None:  # as `sidecar check` says it
        logging.getLogger("sidecar").warning("%s", dane_warning)
    raise_nofile_limit()  # before forking: workers inherit it
    try:
        # The TLS-RPT results store: made (or found) now, so that a state_dir that cannot
        # hold it stops the start with a clear error. Workers open their own.
        tls_store = TlsRptStore.open(config.delivery.state_dir)
    except StateDirError as e:
        click.echo(f"error: {e}", err=True)
        shutdown_logging()
        sys.exit(EXIT_CONFIG_ERROR)
    try:
        if config.server.worker_count > 1:
            sys.exit(supervise(config, config_path))
        trio.run(partial(run_until_signal, config, config_path, tls_store=tls_store))
    except ListenError as e:
        click.echo(f"error: cannot listen on {e}", err=True)
        sys.exit(1)
    finally:
        shutdown_logging()  # the buffered log lines (also at exit; here before click's exit)


@main.command()
@config_option
@click.option(
    "-l",
    "--listener",
    "listener_address",
    metavar="HOST:PORT",
    help="Route as mail arriving on this listener (default: the first one).",
)
@click.argument("address")
def route(config_path: str, listener_address: str | None, address: str) -> None:
    """Explain how mail to ADDRESS would go, without sending anything: binding, proxy or
    bypass, the proxy server and whether it answers now, and each MX address with the source
    address written for it. With traffic shaping on: the site, each egress path's limits
    and their scope, and its usage now (asked of the running sidecar's status endpoint)."""
    config = _load(config_path)
    listener = config.listeners[0]
    if listener_address is not None:
        matches = [item for item in config.listeners if str(item.address) == listener_address]
        if not matches:
            known = ", ".join(str(item.address) for item in config.listeners)
            click.echo(f"error: no listener {listener_address} (have: {known})", err=True)
            sys.exit(EXIT_CONFIG_ERROR)
        listener = matches[0]
    try:
        recipient = parse_rcpt_to(f"TO:<{address.strip('<>')}>").recipient
    except CommandError as e:
        click.echo(f"error: {address}: {e.reply.text}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)

    reader = status_reader(status_urls(config, "/status"), _get)
    lines, ok = trio.run(explain_route, config, listener, recipient, reader)
    for line in lines:
        click.echo(line)
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the banner.")
def probe(config_path: str, timeout: float) -> None:
    """Check that a running sidecar answers: each listener with a 220 banner (or its 554 5.7.1
    when allowed_clients does not list this host), and /healthz when [status] is configured.
    Exit 0 when all do (the Dockerfile's HEALTHCHECK). Says NOOP, then QUIT: the sidecar
    counts it as a probe (sidecar_probes_total), not as a client session."""
    config = _load(config_path)
    failures = 0
    for listener in config.listeners:
        host, port = listener.address.host, listener.address.port
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                banner = sock.recv(512)
                # NOOP first: the sidecar counts this connection as a probe, not a client
                # session, and does not log it even when allowed_clients refuses it.
                sock.sendall(b"NOOP\r\nQUIT\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(512)
        except OSError as e:
            click.echo(f"{listener.address}: {describe_error(e)}", err=True)
            failures += 1
            continue
        # 554 5.7.1: the sidecar answers, but allowed_clients does not list this host (the
        # probe checks that the listener is served, not that it may send mail).
        if not banner.startswith((b"220", ACCESS_DENIED_BANNER)):
            click.echo(f"{listener.address}: unexpected banner {banner[:80]!r}", err=True)
            failures += 1
    if config.status.address is not None:
        url = f"http://{config.status.address}/healthz"
        try:
            with _urlopen(url, timeout) as response:
                response.read()
        except (OSError, ValueError) as e:  # HTTPError (503 while shutting down) is an OSError
            click.echo(f"{url}: {describe_error(e)}", err=True)
            failures += 1
    sys.exit(1 if failures else 0)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON of /status.")
def status(config_path: str, as_json: bool) -> None:
    """Show a running sidecar's state: each HAProxy server (plumbed or not, consecutive
    counts, last check and error), each binding, and the counters. Needs [status] address."""
    config = _load(config_path)
    address = config.status.address
    if address is None:
        click.echo("error: status.address is not set in the configuration", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    try:
        with _urlopen(f"http://{address}/status", 5) as response:
            data = json.load(response)
    except (OSError, ValueError) as e:
        click.echo(f"error: no status from http://{address}/status: {describe_error(e)}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for line in render_table(snapshot_from_json(data)):
        click.echo(line)


def _control(config: Config, action: str, request: dict[str, object]) -> None:
    """POST ``request`` to /shaping/``action`` of every worker; print what each answered.
    Exits 2 when [status] address is unset, 1 when a worker did not answer or refused."""
    urls = status_urls(config, f"/shaping/{action}")
    if not urls:
        click.echo(
            f"error: status.address is not set in the configuration: {action} talks to the"
            " running sidecar through its status endpoint",
            err=True,
        )
        sys.exit(EXIT_CONFIG_ERROR)
    import urllib.error

    body = json.dumps(request).encode()
    failures = 0
    for url in urls:
        try:
            with _urlopen(url, 5, body) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error", e.reason)
            except (ValueError, AttributeError):
                reason = e.reason
            click.echo(f"error: {url}: {e.code} {reason}", err=True)
            failures += 1
            continue
        except (OSError, ValueError) as e:
            click.echo(
                f"error: no answer from {url} (is the sidecar running?): {describe_error(e)}",
                err=True,
            )
            failures += 1
            continue
        for path in answer.get("paths", []):
            what = "suspended" if action == "suspend" else "resumed"
            more = (
                f" for {answer['duration']:g}s: {answer['reason']}" if action == "suspend" else ""
            )
            where = f" ({url})" if len(urls) > 1 else ""
            click.echo(f"{what} egress {path['source']} to site {path['site']}{more}{where}")
    sys.exit(1 if failures else 0)


def _binding_checked(config: Config, binding: str) -> None:
    if binding not in config.bindings:
        known = ", ".join(sorted(config.bindings))
        click.echo(f"error: no binding {binding!r} in the configuration (have: {known})", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@main.command()
@config_option
@click.option("--binding", required=True, help="The binding whose egress paths to suspend.")
@click.option(
    "--site",
    required=True,
    help='A named site, or an MX host set like "mx1.example.com,mx2.example.com".',
)
@click.option("--duration", required=True, help='How long: "90s", "30min", "2h".')
@click.option("--reason", default="suspended by hand", show_default=True, help="Why (logged).")
def suspend(config_path: str, binding: str, site: str, duration: str, reason: str) -> None:
    """Suspend a binding's egress paths (its IPv4 and IPv6 source) to a site on the running
    sidecar: no new connection or transaction there, the MTA gets 451 4.4.5 at once. Sent
    to every worker's status endpoint (needs [status] address; a loopback caller by
    default, see status.allow_control_from)."""
    config = _load(config_path)
    _binding_checked(config, binding)
    from sidecar.shaping.model import parse_duration

    try:
        parse_duration(duration)
    except ValueError as e:
        click.echo(f"error: --duration: {e}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    request: dict[str, object] = {
        "binding": binding,
        "site": site,
        "duration": duration,
        "reason": reason,
    }
    _control(config, "suspend", request)


@main.command()
@config_option
@click.option("--binding", required=True, help="The binding whose egress paths to resume.")
@click.option("--site", required=True, help="A named site, or an MX host set.")
def resume(config_path: str, binding: str, site: str) -> None:
    """End the suspension (and any limits a rule set) of a binding's egress paths to a site
    on the running sidecar, now. Sent to every worker's status endpoint."""
    config = _load(config_path)
    _binding_checked(config, binding)
    _control(config, "resume", {"binding": binding, "site": site})


DEFAULT_KEEP_DAYS = 30


@main.command("tls-report")
@config_option
@click.option(
    "--date",
    "day_text",
    metavar="YYYY-MM-DD",
    help="The UTC day to report. Default: yesterday (UTC).",
)
@click.option(
    "--output-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the report files go (created if missing).",
)
@click.option("--organization", help="organization-name of the reports. Default: server.hostname.")
@click.option(
    "--submitter", help="The reporting domain (file names, headers). Default: server.hostname."
)
@click.option("--contact", help="contact-info of the reports. Default: postmaster@SUBMITTER.")
@click.option("--from", "sender", help="From of the report e-mails. Default: the contact.")
@click.option(
    "--keep-days",
    default=DEFAULT_KEEP_DAYS,
    show_default=True,
    type=click.IntRange(min=0),
    help="Forget recorded days older than this many days before today (0: keep all).",
)
def tls_report(
    config_path: str,
    day_text: str | None,
    output_dir: Path,
    organization: str | None,
    submitter: str | None,
    contact: str | None,
    sender: str | None,
    keep_days: int,
) -> None:
    """Write the TLS-RPT (RFC 8460) aggregate reports of a day, from the TLS session results
    the running sidecar records under delivery.state_dir: one gzip JSON report per recipient
    domain that publishes an _smtp._tls TXT record (looked up through dns.nameservers), and
    for its mailto: URIs the whole e-mail (.eml). Prints one line per destination, "URI
    FILE", for a cron job to send (README: TLS-RPT); sends nothing itself."""
    from sidecar.mxtls.tlsrpt import Reporter
    from sidecar.mxtls.tlsrpt_report import write_reports
    from sidecar.resolver import Resolver

    config = _load(config_path)
    now = datetime.now(UTC)
    try:
        day = date.fromisoformat(day_text) if day_text else now.date() - timedelta(days=1)
    except ValueError:
        click.echo(f"error: --date {day_text}: not a date like 2026-01-31", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    try:
        store = TlsRptStore.open(config.delivery.state_dir)
    except StateDirError as e:
        click.echo(f"error: {describe_error(e)}", err=True)
        sys.exit(1)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        click.echo(f"error: --output-dir {output_dir}: {e.strerror or describe_error(e)}", err=True)
        sys.exit(1)
    hostname = config.server.hostname
    submitter = submitter or hostname
    contact = contact or f"postmaster@{submitter}"
    reporter = Reporter(organization or hostname, contact, submitter, hostname)
    resolver = Resolver(config.dns)
    try:
        written = trio.run(
            write_reports,
            store,
            day,
            reporter,
            resolver.resolve_txt,
            output_dir,
            sender or contact,
            now,
        )
        pruned = store.prune(now.date() - timedelta(days=keep_days)) if keep_days else 0
    except (OSError, sqlite3.Error) as e:
        click.echo(f"error: {describe_error(e)}", err=True)
        sys.exit(1)
    for uri, path in written.targets:
        click.echo(f"{uri} {path}")
    summary = f"{day}: {len(written.reports)} reports in {output_dir}"
    if written.unpublished:
        summary += f"; no TLS-RPT record: {', '.join(written.unpublished)}"
    if pruned:
        summary += f"; {pruned} old rows pruned"
    click.echo(summary, err=True)
    for domain, why in written.failed:
        click.echo(f"error: {domain}: {why} (run again for --date {day})", err=True)
    sys.exit(1 if written.failed else 0)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="sidecar")
