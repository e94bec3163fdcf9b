"""Engine.delete runs the shim's rootfs unmount beside the core's delete, unless a
poststop hook may still read the bundle (shim/engine.py)."""

import asyncio
import threading

from shim.engine import Engine


class _Reaper:
    def collect_thread_children(self) -> None:
        pass


class _Container:
    def __init__(self, hooks: dict) -> None:
        self.data = {"hooks": hooks} if hooks else {}
        self.deleting = threading.Event()
        self.deleted = False

    def delete(self, force: bool = False) -> None:
        self.deleting.set()
        self.deleted = True


def _run(container: _Container) -> list[str]:
    seen: list[str] = []

    def unmount() -> None:
        # In its own worker: it may wait for the core's delete, which does not wait for it.
        seen.append("ran" if container.deleting.wait(5) else "delete never began")

    async def scenario():
        await Engine("/nonexistent", _Reaper()).delete(container, alongside=unmount)

    asyncio.run(scenario())
    assert container.deleted
    return seen


def test_the_unmount_runs_with_the_delete():
    assert _run(_Container({})) == ["ran"]


def test_not_when_a_poststop_hook_may_read_the_bundle():
    # The caller (Task.release) unmounts afterwards.
    assert _run(_Container({"poststop": [{"path": "/bin/true"}]})) == []
