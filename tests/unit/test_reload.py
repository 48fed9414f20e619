"""SIGHUP's re-read of the configuration file (sidecar.server._reload): a file whose content
did not change is said to be unchanged (the single-file bind mount that pins the old inode)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from sidecar.config import Config
from sidecar.server import _reload, file_digest

CONFIG = """
[[listener]]
address = "127.0.0.1:2525"
binding = "b1"

[binding.b1]
ha_proxy_server = "127.0.0.1:5000"
ha_proxy_src_addr = "192.0.2.10"
"""


async def test_reload_of_an_unchanged_file_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(CONFIG, encoding="utf-8")
    send, receive = trio.open_memory_channel[Config](1)
    started = file_digest(str(path))
    caplog.set_level(logging.INFO, logger="sidecar")

    loaded = await _reload(str(path), send, started)
    # Re-read all the same: the files it names (a CA bundle) may have changed.
    assert receive.receive_nowait().bindings["b1"] is not None
    assert "configuration unchanged" in caplog.text
    assert str(path) in caplog.text and "mount its directory" in caplog.text
    assert loaded == started

    caplog.clear()
    path.write_text(CONFIG.replace("192.0.2.10", "192.0.2.11"), encoding="utf-8")
    loaded = await _reload(str(path), send, loaded)
    assert str(receive.receive_nowait().bindings["b1"].ha_proxy_src_addr) == "192.0.2.11"
    assert "unchanged" not in caplog.text
    assert loaded != started and loaded == file_digest(str(path))


async def test_reload_of_an_invalid_file_keeps_the_last_digest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(CONFIG, encoding="utf-8")
    send, receive = trio.open_memory_channel[Config](1)
    started = file_digest(str(path))
    path.write_text("[binding.b1]\nha_proxy_src_addr = 1\n", encoding="utf-8")
    assert await _reload(str(path), send, started) == started
    assert "reload failed" in caplog.text and "unchanged" not in caplog.text
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()
    path.unlink()
    assert file_digest(str(path)) is None
    assert await _reload(str(path), send, started) == started


async def test_a_reload_keeps_the_one_tls_rpt_store_of_the_process(tmp_path: Path) -> None:
    from sidecar.config import parse_config
    from sidecar.mxtls.tlsrpt_store import TlsRptStore
    from sidecar.server import Runtime

    def config(state_dir: str) -> dict[str, object]:
        return {
            "server": {"hostname": "sidecar.test"},
            "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
            "binding": {
                "b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.10"}
            },
            "delivery": {"state_dir": state_dir},
        }

    store = TlsRptStore.open(str(tmp_path / "one"))
    runtime = Runtime(parse_config(config(str(tmp_path / "one"))), tls_reporter=store)
    assert runtime.context.tls_reporter is store
    new = runtime.reload(parse_config(config(str(tmp_path / "other"))))
    assert new.tls_reporter is store
