"""What ``sidecar suspend`` and ``sidecar resume`` ask a running sidecar (through the status
endpoint's ``POST /shaping/suspend`` and ``POST /shaping/resume``, :mod:`sidecar.status`),
and what it does: suspend or resume the egress paths of one binding to one site.

A binding's paths are its IPv4 and its IPv6 source address (those it sets) to the site. The
site is written as a named site (``[shaping.site."NAME"]``) or as an MX host set
(``"mx1.example.com,mx2.example.com"``), normalised as the sessions do (an MX set that a
named site's patterns match is that named site).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sidecar.config import Config
from sidecar.shaping.model import EgressPath, parse_duration
from sidecar.shaping.shaper import Shaper

__all__ = ["MAX_REASON", "binding_paths", "control"]

MAX_REASON: Final = 200  # characters of an operator's reason kept (it goes into a 4xx text)


def binding_paths(config: Config, shaper: Shaper, binding: str, site: str) -> list[EgressPath]:
    """The egress paths of ``binding`` (its IPv4 and IPv6 sources) to ``site`` (a named site
    or a comma-separated MX host set). KeyError when there is no such binding."""
    found = config.bindings[binding]
    if site in shaper.policy.sites:
        name = site
    else:
        name = shaper.policy.site_of(h.strip() for h in site.split(",") if h.strip())
    sources = [found.ha_proxy_src_addr, found.ha_proxy_ipv6_src_addr]
    return [EgressPath(str(source), name) for source in sources if source is not None]


def _text_field(request: Mapping[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'"{name}" must be a non-empty string')
    return value.strip()


async def control(
    config: Config, shaper: Shaper | None, action: str, request: Mapping[str, Any]
) -> tuple[int, dict[str, object]]:
    """Serve one control request: ``action`` "suspend" (``binding``, ``site``,
    ``duration`` as "2h" or seconds, optional ``reason``) or "resume" (``binding``,
    ``site``). Returns (HTTP status code, JSON answer): 200 with the paths acted on; 400 for
    a malformed request; 404 for an unknown binding; 409 when nothing is shaped (no
    shaper) or the binding has no source address."""
    if shaper is None:
        return 409, {"error": "traffic shaping is off in the running configuration"}
    try:
        binding = _text_field(request, "binding")
        site = _text_field(request, "site")
        duration = 0.0
        reason = ""
        if action == "suspend":
            raw = request.get("duration")
            if not isinstance(raw, str | int | float) or isinstance(raw, bool):
                raise ValueError('"duration" must be a duration like "2h" or seconds')
            duration = parse_duration(raw)
            given = request.get("reason", "suspended by hand")
            if not isinstance(given, str):
                raise ValueError('"reason" must be a string')
            reason = " ".join(given.split())[:MAX_REASON] or "suspended by hand"
    except ValueError as error:
        return 400, {"error": str(error)}
    if binding not in config.bindings:
        known = ", ".join(sorted(config.bindings))
        return 404, {"error": f"no binding {binding!r} (have: {known})"}
    paths = binding_paths(config, shaper, binding, site)
    if not paths:
        return 409, {"error": f"binding {binding!r} has no source address"}
    for path in paths:
        if action == "suspend":
            await shaper.suspend(path, duration, reason, binding=binding)
        else:
            await shaper.resume(path, binding=binding)
    answer: dict[str, object] = {
        "action": action,
        "binding": binding,
        "paths": [{"source": p.source, "site": p.site} for p in paths],
    }
    if action == "suspend":
        answer["duration"] = duration
        answer["reason"] = reason
    return 200, answer
