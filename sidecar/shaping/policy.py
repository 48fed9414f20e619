"""The shaping configuration as the runtime asks it, sans-IO: which site a destination's MX
hosts are, which limits a (binding, site) has, which rules react to a site's replies."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from typing import Final

from sidecar.config.schema import Config, RuleAction, ShapingLimits
from sidecar.shaping.model import PathLimits
from sidecar.smtp.replies import Reply

__all__ = ["Rule", "ShapingPolicy", "normalise_site"]

_ENHANCED_PREFIX: Final = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")
_LIMIT_FIELDS: Final = tuple(f.name for f in fields(PathLimits))


def normalise_site(mx_hosts: Iterable[str]) -> str:
    """The site of an unnamed destination: its MX host names lower-cased, without the
    trailing dot, deduplicated, sorted and joined with ","."""
    return ",".join(sorted({h.lower().rstrip(".") for h in mx_hosts}))


def _limits(scope: ShapingLimits) -> PathLimits:
    return PathLimits(**{name: getattr(scope, name) for name in _LIMIT_FIELDS})


def merge(*scopes: PathLimits) -> PathLimits:
    """Field by field, the first scope that sets it (most specific first)."""
    values: dict[str, object] = {}
    for name in _LIMIT_FIELDS:
        values[name] = next(
            (v for s in scopes if (v := getattr(s, name)) is not None),
            None,
        )
    return PathLimits(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Rule:
    """A ``[[shaping.rule]]``: ``name`` is its key path (``shaping.rule[0]``) for logs."""

    name: str
    site: str | None
    pattern: re.Pattern[str] | None
    code: int | None
    enhanced: str | None
    action: RuleAction
    duration: float  # seconds
    limits: PathLimits  # what "set" uses meanwhile

    def match(self, reply: Reply) -> bool:
        """True when the MX's ``reply`` meets every condition the rule sets: the code, the
        enhanced status code (RFC 3463, at the start of the first line) and the regex,
        searched in the reply as sent (``"421-4.7.28 text"`` per line, lines joined by "\\n";
        the rule's regex is compiled with ``re.MULTILINE``)."""
        if self.code is not None and reply.code != self.code:
            return False
        if self.enhanced is not None:
            found = _ENHANCED_PREFIX.match(reply.lines[0])
            if found is None or found[1] != self.enhanced:
                return False
        if self.pattern is not None:
            last = len(reply.lines) - 1
            text = "\n".join(
                f"{reply.code}{' ' if i == last else '-'}{line}"
                for i, line in enumerate(reply.lines)
            )
            if self.pattern.search(text) is None:
                return False
        return True


class ShapingPolicy:
    """Sites, limits and rules from a :class:`~sidecar.config.Config` (immutable: a new
    configuration makes a new policy)."""

    def __init__(self, config: Config) -> None:
        shaping = config.shaping
        self.max_wait = shaping.max_wait
        self.slot_lease = shaping.slot_lease
        self._sites: Mapping[str, tuple[str, ...]] = {
            name: site.mx for name, site in shaping.sites.items()
        }
        self._global = merge(
            _limits(shaping),
            PathLimits(max_deliveries_per_connection=config.delivery.connection_reuse_limit),
        )
        self._site_limits = {name: _limits(site) for name, site in shaping.sites.items()}
        self._binding_limits = {name: _limits(b.shaping) for name, b in config.bindings.items()}
        self._binding_site_limits = {
            (name, site): _limits(limits)
            for name, b in config.bindings.items()
            for site, limits in b.shaping.sites.items()
        }
        self.rules: tuple[Rule, ...] = tuple(
            Rule(
                name=f"shaping.rule[{i}]",
                site=r.site,
                pattern=r.pattern,
                code=r.code,
                enhanced=r.enhanced,
                action=r.action,
                duration=r.duration,
                limits=r.limits,
            )
            for i, r in enumerate(shaping.rules)
        )
        self._cache: dict[tuple[str, str | None], PathLimits] = {}

    @property
    def sites(self) -> tuple[str, ...]:
        """The named sites, in configuration order (e.g. for bounded metric labels)."""
        return tuple(self._sites)

    def site_of(self, mx_hosts: Iterable[str]) -> str:
        """The site of a destination whose MX host names are ``mx_hosts``: the first named
        site (configuration order) with a pattern matching any of them (fnmatch,
        case-insensitive, trailing dot ignored), else :func:`normalise_site`."""
        hosts = [h.lower().rstrip(".") for h in mx_hosts]
        for name, patterns in self._sites.items():
            if any(fnmatchcase(h, p) for h in hosts for p in patterns):
                return name
        return normalise_site(hosts)

    def limits(self, binding: str, site: str) -> PathLimits:
        """The configured limits of ``binding``'s path to ``site``: binding x site, binding,
        site, ``[shaping]``, merged key by key (the most specific that sets a key wins);
        ``max_deliveries_per_connection`` falls back to delivery.connection_reuse_limit."""
        named = site if site in self._sites else None
        key = (binding, named)
        found = self._cache.get(key)
        if found is None:
            scopes = []
            if named is not None and (binding, named) in self._binding_site_limits:
                scopes.append(self._binding_site_limits[(binding, named)])
            if binding in self._binding_limits:
                scopes.append(self._binding_limits[binding])
            if named is not None:
                scopes.append(self._site_limits[named])
            found = merge(*scopes, self._global)
            self._cache[key] = found
        return found

    def rules_for(self, site: str) -> list[Rule]:
        """The rules that apply to ``site`` (its own and the global ones), in configuration
        order."""
        return [r for r in self.rules if r.site is None or r.site == site]
