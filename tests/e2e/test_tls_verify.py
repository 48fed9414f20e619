"""``tls = "verify"`` (the MX certificate must chain to the CA bundle and name the MX host) and
per-domain TLS policies (``[domain."x"] tls = ...``, also under bindings), end to end through
HAProxy."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from sidecar import upstream

from .harness import (
    MESSAGE,
    Endpoint,
    Lab,
    SendResult,
    TestMX,
    final_status,
    refusal,
    send,
    server_tls_context,
)


class TlsWorld:
    """Two domains, each with its own MX host (certificates from ``ca`` for ``names``)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    async def start(
        self, ca: trustme.CA, cert_names: dict[str, str], ca_file: Path | None, **config: Any
    ) -> tuple[Endpoint, dict[str, TestMX]]:
        """``cert_names``: domain -> the name in its MX's certificate (its MX host is
        ``mx.<domain>``)."""
        domains = list(cert_names)
        delivery = {"mx_command_timeout": 2, "banner_timeout": 2, **config.pop("delivery", {})}
        if ca_file is not None:
            delivery["tls_ca_file"] = str(ca_file)
        stack = await self.lab.build(
            mxes=[{"tls_context": server_tls_context(ca, cert_names[d])} for d in domains],
            hosts=[f"mx.{domain}" for domain in domains],
            domains={domain: index for index, domain in enumerate(domains)},
            delivery=delivery,
            sections=config,
        )
        return stack.endpoint, dict(zip(domains, stack.mxes, strict=True))


def _ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def _one(endpoint: Endpoint, domain: str) -> SendResult:
    return await send(endpoint, "a@client.test", [f"rcpt@{domain}"], MESSAGE)


async def test_verify_delivers_to_an_mx_with_a_valid_certificate(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, tls_ca: trustme.CA, lab: Lab
) -> None:
    world = TlsWorld(lab)
    endpoint, mxes = await world.start(
        tls_ca,
        {"good.test": "mx.good.test", "wrongname.test": "elsewhere.test"},
        _ca_file(tmp_path, tls_ca),
        delivery={"tls": "verify"},
    )
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        result = await _one(endpoint, "good.test")
    assert final_status(result) == (250, "2.0.0")
    (message,) = mxes["good.test"].messages
    assert message.tls
    # The transaction's log line names the protocol and cipher.
    (record,) = [r for r in caplog.records if r.name == "sidecar.transaction"]
    tls = record.fields["tls"]  # type: ignore[attr-defined]
    assert tls.startswith("TLSv1.") and len(tls.split()) == 2, tls
    assert record.fields["tls_policy"] == "verify"  # type: ignore[attr-defined]

    # A certificate that does not name the MX host: not delivered, the client may retry.
    result = await _one(endpoint, "wrongname.test")
    assert refusal(result, "rcpt@wrongname.test")[0] == 451
    # The reply says why (not "TLS handshake failed: " and nothing more).
    assert (
        b"TLS handshake failed: certificate verify failed: Hostname mismatch"
        in result.refused["rcpt@wrongname.test"][1]
    ), result.refused
    assert mxes["wrongname.test"].messages == []
    assert all(
        b"MAIL" not in c for conn in mxes["wrongname.test"].connections for c in conn.commands
    )


async def test_verify_refuses_a_certificate_from_an_unknown_ca(tmp_path: Path, lab: Lab) -> None:
    trusted, other = trustme.CA(), trustme.CA()
    world = TlsWorld(lab)
    endpoint, mxes = await world.start(
        other,
        {"self.test": "mx.self.test"},
        _ca_file(tmp_path, trusted),
        delivery={"tls": "verify"},
    )
    result = await _one(endpoint, "self.test")
    code, enhanced = refusal(result, "rcpt@self.test")
    assert code == 451 and enhanced.startswith("4.")
    text = result.refused["rcpt@self.test"][1]
    assert b"TLS handshake failed: certificate verify failed: " in text, text
    assert b"unable to get local issuer certificate" in text, text
    assert mxes["self.test"].messages == []
    # Never a fallback to plaintext under "verify".
    assert all(
        conn.tls or b"MAIL" not in b" ".join(conn.commands)
        for conn in mxes["self.test"].connections
    )


async def test_per_domain_tls_policy_overrides_delivery_tls(
    tmp_path: Path, tls_ca: trustme.CA, lab: Lab
) -> None:
    world = TlsWorld(lab)
    endpoint, mxes = await world.start(
        tls_ca,
        {"plain.test": "mx.plain.test", "bank.test": "mx.bank.test"},
        _ca_file(tmp_path, tls_ca),
        delivery={"tls": "disabled"},
        domain={"bank.test": {"tls": "verify"}},
    )
    assert final_status(await _one(endpoint, "plain.test")) == (250, "2.0.0")
    assert final_status(await _one(endpoint, "bank.test")) == (250, "2.0.0")
    assert not mxes["plain.test"].messages[0].tls  # delivery.tls = "disabled"
    assert mxes["bank.test"].messages[0].tls  # the domain's own policy


async def test_a_local_tls_context_error_at_delivery_is_a_clear_4xx(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tls_ca: trustme.CA, lab: Lab
) -> None:
    """Should the TLS context still fail at delivery time (the configuration loads the CA
    bundle, so only the system store is left to fail), the client gets a 4xx naming the
    cause, the log one line without a traceback, and the MX no STARTTLS it cannot finish."""

    def unreadable(ca_file: str | None) -> ssl.SSLContext:
        raise PermissionError(13, "Permission denied", "/etc/ssl/certs/ca-certificates.crt")

    monkeypatch.setattr(upstream, "_cached_verifying_context", unreadable)
    world = TlsWorld(lab)
    endpoint, mxes = await world.start(
        tls_ca, {"good.test": "mx.good.test"}, None, delivery={"tls": "verify"}
    )
    with caplog.at_level(logging.INFO):
        result = await _one(endpoint, "good.test")
    assert refusal(result, "rcpt@good.test") == (451, "4.3.0")
    text = result.refused["rcpt@good.test"][1]
    assert b"Permission denied" in text and b"ca-certificates.crt" in text, text
    mx = mxes["good.test"]
    connection = await mx.wait_closed()
    assert [c.split(b" ")[0] for c in connection.commands] == [b"EHLO", b"QUIT"]
    assert len(mx.connections) == 1  # a local fault: no other MX, no plaintext retry
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "cannot start TLS towards mx.good.test: Permission denied: "
        '"/etc/ssl/certs/ca-certificates.crt"'
    ]
    assert all(r.exc_info is None for r in caplog.records)
