"""Unit tests run without touching the disk outside their tmp dirs: the MTA-STS policy store
(on by default, under delivery.state_dir = /var/lib/sidecar) is kept in memory."""

from __future__ import annotations

import pytest

from sidecar.config import Config
from sidecar.mxtls import sts_cache


@pytest.fixture(autouse=True)
def memory_sts_store(monkeypatch: pytest.MonkeyPatch) -> None:
    def open_store(config: Config) -> sts_cache.StsStore:
        return sts_cache.StsStore()

    monkeypatch.setattr(sts_cache, "open_store", open_store)
