"""Reading a ``/metrics`` body in tests: parsed with prometheus_client's own parser, so a
test asks for a series by name and labels, whatever the exposition's number format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``text``: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name`` with exactly ``labels`` (None: not exported)."""
    return samples(text).get((name, frozenset(labels.items())))


def names(text: str) -> set[str]:
    """The sample names ``text`` exports (``_total``, ``_bucket``... included)."""
    return {name for name, _ in samples(text)}
