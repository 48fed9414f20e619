"""The commented starter configuration that ``sidecar init`` writes: ``starter.toml``, shipped
with the package (``examples/sidecar.toml`` is a link to it, so there is one copy)."""

from importlib import resources

STARTER_CONFIG = resources.files("sidecar").joinpath("starter.toml").read_text(encoding="utf-8")
