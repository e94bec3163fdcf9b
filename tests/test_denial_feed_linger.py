"""The shim's denial feed keeps its records' source open a moment after its last
container (shim/denials.py, READER_LINGER_SECONDS): containers run one after another
must not open it (and start the node's audit reader) once each."""

import asyncio
import os

from runtime import denials
from shim import denials as shim_denials


class _Source:
    """Stands in for the node reader's connection: a real fd for the loop, no records."""

    def __init__(self) -> None:
        self._read_end, self._write_end = os.pipe()
        self.closed = False

    def fileno(self) -> int:
        return self._read_end

    def read(self, limit: int = 0) -> list:
        return []

    def close(self) -> None:
        os.close(self._read_end)
        os.close(self._write_end)
        self.closed = True


class _Watcher:
    def watch(self, *args) -> None:
        pass

    def unwatch(self, container_id: str) -> None:
        pass

    def sessions(self) -> set:
        return set()

    def flush(self) -> None:
        pass


def test_the_source_outlives_the_last_container_by_the_linger_and_no_longer(monkeypatch, tmp_path):
    monkeypatch.setattr(denials, "enabled", lambda: True)
    monkeypatch.setattr(shim_denials, "READER_LINGER_SECONDS", 0.05)
    opened: list[_Source] = []

    async def scenario():
        feed = shim_denials.DenialFeed(asyncio.get_running_loop(), lambda *a: None)
        feed.watcher = _Watcher()

        def open_source():
            if feed.kernel is None:
                feed.kernel = _Source()
                feed.loop.add_reader(feed.kernel.fileno(), lambda: None)
                opened.append(feed.kernel)

        feed._open_kernel_records = open_source
        feed.watch("first", str(tmp_path), 1, None, {})
        feed.unwatch("first")
        assert feed.kernel is opened[0] and not opened[0].closed  # lingers
        feed.watch("second", str(tmp_path), 2, None, {})
        feed.unwatch("second")
        await asyncio.sleep(0.02)
        assert len(opened) == 1 and not opened[0].closed  # the second reused it
        await asyncio.sleep(0.1)
        assert opened[0].closed and feed.kernel is None  # closed once the linger is up

    asyncio.run(scenario())
