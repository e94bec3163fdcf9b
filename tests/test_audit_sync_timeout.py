"""A stuck child must not hang the process that spawned it (issue 10, item 10).

The parent (zviz, or the shim serving every other container) waits for each message
of the container's setup on the sync channel; a child stuck in the kernel (a hung
FUSE lookup in a volume) sent none and the parent waited forever.
"""

import os
import time

import pytest

from runtime import errors
from runtime.spawn import parent as spawn_parent
from runtime.sync import Sync


def test_recv_gives_up_after_its_timeout():
    parent, child = Sync.pair()
    try:
        started = time.monotonic()
        with pytest.raises(errors.FailedPrecondition, match="no word"):
            parent.recv(timeout=0.2)
        assert time.monotonic() - started < 5
        child.send("ready")
        assert parent.recv(timeout=5) == {"type": "ready"}  # a message in time still arrives
    finally:
        parent.close()
        child.close()


def test_a_silent_child_is_killed_and_reaped_at_the_timeout():
    parent, child_end = Sync.pair()
    pid = os.fork()
    if pid == 0:  # stuck: holds its end open and never reports
        parent.close()
        time.sleep(60)
        os._exit(0)
    child_end.close()
    started = time.monotonic()
    with pytest.raises(errors.FailedPrecondition, match="no word"):
        spawn_parent._until_ready(pid, parent, "stuck child", None, lambda *_: None, timeout=0.3)
    assert time.monotonic() - started < 10
    with pytest.raises(ChildProcessError):  # killed and already reaped
        os.waitpid(pid, os.WNOHANG)


def test_hooks_run_during_setup_extend_the_timeout():
    spec_hooks = {"createContainer": [{"path": "/bin/true", "timeout": 5}, {"path": "/bin/true"}]}
    expected = spawn_parent.SETUP_MESSAGE_TIMEOUT + 5 + spawn_parent.SETUP_MESSAGE_TIMEOUT
    assert spawn_parent.setup_timeout(spec_hooks, ("createContainer",)) == expected
    assert (
        spawn_parent.setup_timeout(None, ("createContainer",)) == spawn_parent.SETUP_MESSAGE_TIMEOUT
    )
