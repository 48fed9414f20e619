"""Running the sidecar itself in e2e tests: in-process (``serve`` in the test's nursery) with a
config built from a dict, plus smtplib-based clients run in a thread."""

from __future__ import annotations

import atexit
import shutil
import smtplib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar.config import Config, parse_config
from sidecar.server import serve
from testkit.client import RawSMTPClient
from testkit.net import Addresses, Endpoint


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
    state_dir: str | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A sidecar config dict: ``listeners`` are (address, binding name) pairs. Each config
    has its own ``delivery.state_dir`` (MTA-STS is on by default and keeps its policies
    there): ``state_dir``, else a fresh temporary directory."""
    if state_dir is None:
        state_dir = tempfile.mkdtemp(prefix="sidecar-e2e-state-")
        atexit.register(shutil.rmtree, state_dir, True)  # removed when the test run ends
    config: dict[str, Any] = {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": address, "binding": name} for address, name in listeners],
        "dns": {"nameservers": [str(nameserver)] if nameserver else [], "timeout": 2},
        "delivery": {
            "port": port,
            "allow_private_destinations": True,
            "tls": "disabled",
            "state_dir": state_dir,
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


# -- timeouts short enough for tests that wait for them ----------------------------------------

FAST_SERVER: dict[str, Any] = {
    "client_command_timeout": 10,
    "data_timeout": 10,
    "shutdown_grace": 2,
}
FAST_DELIVERY: dict[str, Any] = {
    "setup_timeout": 10,
    "connect_timeout": 2,
    "banner_timeout": 5,
    "mx_command_timeout": 5,
    "data_init_timeout": 5,
    "data_send_timeout": 5,
    "data_done_timeout": 5,
}


# -- helpers for the routing / DNS / health / TLS tests ----------------------------------------


def proxied_binding(
    server: object, source: str | None = None, ipv6_source: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A ``[binding.NAME]`` table: ``server`` is an HAProxy endpoint (anything whose ``str()``
    is ``host:port``), ``source``/``ipv6_source`` the PROXY header's source per family."""
    binding: dict[str, Any] = {"ha_proxy_server": str(server), **extra}
    if source is not None:
        binding["ha_proxy_src_addr"] = source
    if ipv6_source is not None:
        binding["ha_proxy_ipv6_src_addr"] = ipv6_source
    return binding


def refusal(result: SendResult, recipient: str) -> tuple[int, str]:
    """``(code, enhanced status code)`` of a recipient the sidecar refused at RCPT."""
    assert result.error is None, result
    assert recipient in result.refused, result
    code, text = result.refused[recipient]
    return code, text.decode("utf-8", "replace").split(" ", 1)[0]


def final_status(result: SendResult) -> tuple[int, str]:
    """``(code, enhanced status code)`` of the reply to the end of data."""
    assert result.error is None and result.final is not None, result
    code, text = result.final
    return code, text.decode("utf-8", "replace").split(" ", 1)[0]


async def rcpt_reply(endpoint: Endpoint, recipient: str, sender: str = "a@client.test") -> bytes:
    """The raw bytes of the sidecar's reply to ``RCPT TO:<recipient>`` (then QUIT)."""
    async with await RawSMTPClient.connect(endpoint) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command("EHLO client.test")).startswith(b"250")
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith(b"250")
        answer = await client.command(f"RCPT TO:<{recipient}>")
        await client.command("QUIT")
    return answer
