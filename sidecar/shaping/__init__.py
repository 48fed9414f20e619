"""Traffic shaping per egress path (issue 12): connection and rate limits per (source address
written in the PROXY header, or "direct") x *site* (a destination's MX host set, or a named
site), shared by every sidecar that uses the same egress IP through a backend (in-process
memory, or Redis/Valkey).

- :mod:`sidecar.shaping.model`: the values (EgressPath, Rate, PathLimits) and their parsing.
- :mod:`sidecar.shaping.backend`: what a backend does (``ShapingBackend``), the contract the
  memory and Redis backends both keep.
"""
