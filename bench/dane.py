#!/usr/bin/env python3
"""What DANE costs per delivery (issue 13): a real validating unbound in front of a real nsd
serving a zone signed here (testkit/dnssec.py), a trio TestMX with STARTTLS, and the sidecar
in-process delivering to it directly (a bypass domain: no HAProxy, so only DNS and TLS differ).

Run as root (or any user that can bind 127.x addresses) from the repository root::

    .venv/bin/python bench/dane.py [--messages 20]

Two recipient domains share one MX host: ``dane.dane.test`` (DANE on for it: DNSSEC look-ups,
TLSA, chain matched to a 3 1 1 record) and ``plain.dane.test`` (DANE off: the configured
opportunistic TLS). The connection cache is off, so every message is a new connection. Printed
per domain: the first delivery (the sidecar's caches cold, unbound's cold too), the first after
a sidecar restart (unbound warm), and the median of the following ones (both warm); plus the
DNS look-up alone and the chain check alone. Figures go to ``bench/dane-results.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.config import parse_config
from sidecar.mxtls.dane import DanePolicy, TlsaRecord, match_chain
from sidecar.resolver import Resolver
from sidecar.server import serve
from testkit.client import RawSMTPClient
from testkit.dnssec import Nsd, Record, SignedZone, Unbound
from testkit.mx import TestMX
from testkit.net import Endpoint, fixed_ipv4, free_port

DOMAINS = ("dane.dane.test", "plain.dane.test")


async def deliver(endpoint: Endpoint, domain: str) -> float:
    """Seconds from connecting to the sidecar to its reply to the end of data."""
    started = time.perf_counter()
    async with await RawSMTPClient.connect(endpoint) as client:
        assert (await client.read_reply()).startswith(b"220")
        assert (await client.command("EHLO bench.test")).startswith(b"250")
        assert (await client.command("MAIL FROM:<a@bench.test>")).startswith(b"250")
        answer = await client.command(f"RCPT TO:<r@{domain}>")
        assert answer.startswith(b"250"), answer
        assert (await client.command("DATA")).startswith(b"354")
        answer = await client.command("Subject: x\r\n\r\nbench\r\n.")
        assert answer.startswith(b"250"), answer
        await client.command("QUIT")
    return time.perf_counter() - started


def config(listen: Endpoint, unbound: Unbound, port: int) -> dict[str, Any]:
    bypass = {"ha_proxy_bypass": True}
    return {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": str(listen), "binding": "b1"}],
        "dns": {"nameservers": [str(unbound.endpoint)], "timeout": 5},
        "delivery": {
            "port": port,
            "allow_private_destinations": True,
            "connection_cache": False,
            "tls": "opportunistic",
        },
        "binding": {
            "b1": {
                "ha_proxy_server": f"{fixed_ipv4(9)}:9",
                "ha_proxy_src_addr": fixed_ipv4(8),
                "domain": {domain: bypass for domain in DOMAINS},
            }
        },
        "domain": {"dane.dane.test": {"dane": True}},
    }


async def run_sidecar(
    cfg: dict[str, Any], domain_order: list[str], messages: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {domain: [] for domain in DOMAINS}
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        bound = await nursery.start(serve, parse_config(cfg), shutdown)
        endpoint = Endpoint(*bound[0])
        for _ in range(messages):
            for domain in domain_order:
                times[domain].append(await deliver(endpoint, domain))
        shutdown.set()
    return times


async def main_async(messages: int, output: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dane-bench-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.dane.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    mx_host = fixed_ipv4(5)
    port = free_port(mx_host)
    records = [
        Record("mx", "A", mx_host),
        Record("dane", "MX", "10 mx"),
        Record("plain", "MX", "10 mx"),
        Record(f"_{port}._tcp.mx", "TLSA", f"3 1 1 {hashlib.sha256(spki).hexdigest()}"),
    ]
    nsd = Nsd(
        workdir / "nsd",
        Endpoint(fixed_ipv4(2), free_port(fixed_ipv4(2), udp=True)),
        [SignedZone("dane.test", records)],
    )
    unbound = Unbound(
        workdir / "unbound", Endpoint(fixed_ipv4(3), free_port(fixed_ipv4(3), udp=True)), nsd
    )
    lines: list[str] = []
    try:
        nsd.start()
        unbound.start()
        async with trio.open_nursery() as nursery:
            mx = TestMX(Endpoint(mx_host, port), tls_context=server)
            await nursery.start(mx.serve)
            listen = Endpoint(fixed_ipv4(4), free_port(fixed_ipv4(4)))
            cfg = config(listen, unbound, port)
            # Restart unbound between phases to empty its cache for "cold".
            results: dict[str, dict[str, list[float]]] = {}
            for domain in DOMAINS:
                unbound.restart()
                cold = await run_sidecar(cfg, [domain], 1)
                warm_unbound = await run_sidecar(cfg, [domain], 1)
                results[domain] = {
                    "cold": cold[domain],
                    "unbound warm, sidecar cold": warm_unbound[domain],
                }
            # Both warm: one sidecar, the two domains in turn (same load for both).
            warm = await run_sidecar(cfg, list(DOMAINS), messages + 1)
            for domain in DOMAINS:
                results[domain]["both warm"] = warm[domain][1:]
            # DNS alone: the MX result (MX, A, AAAA and, under DANE, TLSA) from a fresh
            # sidecar resolver against the warm unbound.
            dns_times: dict[str, list[float]] = {"dnssec": [], "plain": []}
            for _ in range(messages):
                for kind in dns_times:
                    resolver = Resolver(parse_config(cfg).dns)
                    resolver.tlsa_port = port
                    started = time.perf_counter()
                    await resolver.resolve_mx("dane.dane.test", dnssec=kind == "dnssec")
                    dns_times[kind].append(time.perf_counter() - started)
            mx.close()
            nursery.cancel_scope.cancel()
        policy = DanePolicy.from_records(
            "mx.dane.test", [TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest())]
        )
        rounds = 2000
        started = time.perf_counter()
        for _ in range(rounds):
            assert match_chain(policy, [der]).ok
        check_us = (time.perf_counter() - started) / rounds * 1e6
    finally:
        unbound.stop()
        nsd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms" if values else "      -"

    lines.append(
        f"DANE latency per delivery ({platform.python_version()}, unbound+nsd on loopback, "
        f"connection cache off, {messages} messages per domain; median where several)"
    )
    lines.append(f"{'':28} {'DANE (dane.dane.test)':>24} {'opportunistic (plain)':>24}")
    for phase in ("cold", "unbound warm, sidecar cold", "both warm"):
        lines.append(
            f"{phase:28} {ms(results[DOMAINS[0]][phase]):>24} {ms(results[DOMAINS[1]][phase]):>24}"
        )
    dnssec, plain = ms(dns_times["dnssec"]), ms(dns_times["plain"])
    lines.append(f"{'MX result, fresh resolver':28} {dnssec:>24} {plain:>24}")
    lines.append(f"DANE-EE chain check (match_chain, 3 1 1): {check_us:.0f} us")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    output.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("bench/dane-results.txt"))
    args = parser.parse_args()
    trio.run(main_async, args.messages, args.output)


if __name__ == "__main__":
    main()
