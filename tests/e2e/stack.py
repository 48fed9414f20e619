"""Running the sidecar itself in e2e tests: in-process (``serve`` in the test's nursery) with a
config built from a dict, plus smtplib-based clients run in a thread."""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar.config import Config, parse_config
from sidecar.server import serve

from .harness import Addresses, Endpoint


@dataclass
class RunningSidecar:
    config: Config
    endpoints: list[Endpoint]
    shutdown: trio.Event

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[0]


class SidecarFactory:
    def __init__(self, nursery: trio.Nursery, addresses: Addresses) -> None:
        self.nursery = nursery
        self.addresses = addresses
        self.running: list[RunningSidecar] = []

    async def __call__(self, config: dict[str, Any]) -> RunningSidecar:
        parsed = parse_config(config)
        shutdown = trio.Event()
        bound = await self.nursery.start(serve, parsed, shutdown)
        sidecar = RunningSidecar(parsed, [Endpoint(host, port) for host, port in bound], shutdown)
        self.running.append(sidecar)
        return sidecar

    def listener(self) -> str:
        """A fresh listener address for a config."""
        return str(self.addresses.endpoint())


def make_config(
    *,
    listeners: Sequence[tuple[str, str]],
    bindings: dict[str, dict[str, Any]],
    nameserver: Endpoint | None,
    port: int,
    delivery: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A sidecar config dict: ``listeners`` are (address, binding name) pairs."""
    config: dict[str, Any] = {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": address, "binding": name} for address, name in listeners],
        "dns": {"nameservers": [str(nameserver)] if nameserver else [], "timeout": 2},
        "delivery": {
            "port": port,
            "allow_private_destinations": True,
            "tls": "disabled",
            **(delivery or {}),
        },
        "ha_proxy_client": {"health_check_interval": 0.5, "health_check_timeout": 0.5},
        "binding": bindings,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


@dataclass
class SendResult:
    refused: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    final: tuple[int, bytes] | None = None  # the reply to the end of data
    error: Exception | None = None


def send_message(
    endpoint: Endpoint, sender: str, recipients: Sequence[str], message: bytes
) -> SendResult:
    """Send one message with smtplib (blocking: run it with trio.to_thread.run_sync)."""
    result = SendResult()
    try:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=30) as client:
            client.ehlo("client.test")
            code, text = client.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                if code not in (250, 251):
                    result.refused[recipient] = (code, text)
            if len(result.refused) == len(recipients):
                client.rset()
                return result
            result.final = client.data(message)
    except (smtplib.SMTPException, OSError) as error:
        result.error = error
    return result


async def send(
    endpoint: Endpoint, sender: str, recipients: Sequence[str], message: bytes
) -> SendResult:
    return await trio.to_thread.run_sync(send_message, endpoint, sender, recipients, message)


MESSAGE = b"From: sender@client.test\r\nTo: rcpt@example.test\r\nSubject: e2e\r\n\r\nHello.\r\n"
