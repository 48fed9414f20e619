"""What an MTA-STS look-up costs the first RCPT of a delivery (issue 13): milliseconds per
``MtaSts.lookup`` on loopback, with a real dnsmasq (TXT ``_mta-sts``, A ``mta-sts``) and a
real HTTPS policy server (testkit PolicyServer, port 443, trustme certificate):

- ``fetch``: nothing known: TXT query, A/AAAA of mta-sts.<domain>, TCP + TLS handshake
  (certificate verified), GET, parse, write to the on-disk cache;
- ``cached, TXT asked``: the policy cached, the TXT record asked again (its TTL ran out);
- ``cached, TXT cached``: both cached (the usual case for a busy domain);
- ``no policy``: a domain without a TXT record (NXDOMAIN), asked each time.

    sudo .venv/bin/python bench/mta_sts.py [--rounds 50]

Needs root (port 443) and dnsmasq. Over the Internet add the round trips: one for the TXT
query (if not cached), and for a fetch one for the address, one for TCP, one for TLS 1.3 and
one for the request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.config import parse_config  # noqa: E402
from sidecar.mxtls.sts_cache import MtaSts, StsStore, build_mta_sts  # noqa: E402
from sidecar.resolver import Resolver  # noqa: E402
from testkit import (  # noqa: E402
    Dnsmasq,
    Endpoint,
    HostRecord,
    PolicyResponse,
    PolicyServer,
    TxtRecord,
    fixed_ipv4,
    free_port,
    policy_body,
)

DOMAIN = "bench.test"


async def timed(rounds: int, make: Callable[[], Awaitable[MtaSts]], domain: str) -> float:
    """Median milliseconds of one lookup by a fresh ``make()`` each round."""
    times = []
    for _ in range(rounds):
        sts = await make()
        started = time.perf_counter()
        await sts.lookup(domain)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def main(rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-mta-sts-"))
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # One domain per round of the "fetch" case (each fetched once), plus the warm one.
    domains = [DOMAIN] + [f"d{i}.{DOMAIN}" for i in range(rounds)]
    hosts = [f"mta-sts.{domain}" for domain in domains]
    server = PolicyServer(Endpoint(fixed_ipv4(7), 443), ca, hosts)
    records: list[Any] = []
    for domain, host in zip(domains, hosts, strict=True):
        server.responses[host] = PolicyResponse(policy_body("enforce", [f"*.{domain}"]))
        records.append(TxtRecord(f"_mta-sts.{domain}", "v=STSv1; id=1;"))
        records.append(HostRecord(host, [server.endpoint.host]))
    dns_address = fixed_ipv4(8)
    dnsmasq = Dnsmasq(
        work / "dnsmasq", Endpoint(dns_address, free_port(dns_address, udp=True)), records, ttl=300
    )
    dnsmasq.start()
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": "b"}],
            "binding": {
                "b": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}
            },
            "dns": {"nameservers": [str(dnsmasq.endpoint)]},
            "delivery": {
                "allow_private_destinations": True,
                "tls_ca_file": str(ca_file),
                "state_dir": str(work / "state"),
            },
        }
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            on_disk = StsStore.in_state_dir(config.delivery.state_dir)
            warm = build_mta_sts(config, Resolver(config.dns), on_disk)
            assert warm is not None
            await warm.lookup(DOMAIN)
            cached = on_disk.get(DOMAIN)
            assert cached is not None
            fetched: list[float] = []
            for domain in domains[1:]:  # new resolver (nothing cached), the on-disk store
                sts = build_mta_sts(config, Resolver(config.dns), on_disk)
                assert sts is not None
                started = time.perf_counter()
                found = await sts.lookup(domain)
                fetched.append((time.perf_counter() - started) * 1000)
                assert found.source == "fetched", found

            async def disk_cached() -> MtaSts:
                sts = build_mta_sts(config, Resolver(config.dns), StsStore())
                assert sts is not None
                sts.store.put_memory(cached)
                return sts

            async def all_cached() -> MtaSts:
                return warm

            results = {
                "fetch": statistics.median(fetched),
                "cached, TXT asked": await timed(rounds, disk_cached, DOMAIN),
                "cached, TXT cached": await timed(rounds, all_cached, DOMAIN),
                "no policy": await timed(rounds, disk_cached, "nopolicy.test"),
            }
            server.close()
            nursery.cancel_scope.cancel()
    finally:
        dnsmasq.stop()
    print(f"MTA-STS look-up on loopback, median of {rounds} (ms):")
    for name, value in results.items():
        print(f"  {name:<20} {value:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    trio.run(main, parser.parse_args().rounds)
