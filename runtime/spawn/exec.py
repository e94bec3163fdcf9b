"""An exec: a process that joins the namespaces and cgroup of a running container.

Its child (forked by runtime/spawn/parent.py `spawn_exec`) joins the cgroup and the
namespaces, then either asks the container's exec anchor (runtime/exec_anchor.py) for
the process, which then runs inside PID 1's Landlock domain while a stand-in here is
the exec as its caller knows it, or forks the process and sets it up as PID 1 sets
itself up (runtime/spawn/init.py).

Everything here runs after fork and leaves only through os._exit.
"""

import os
import signal

from runtime import denials, linux
from runtime.spawn.common import (
    Request,
    StageError,
    Stages,
    close_all,
    close_inherited_fds,
    preload,
    run_child,
)
from runtime.spawn.init import finish_process, prepare_process, setup_stdio
from runtime.spawn.namespace_child import host_id_of_container_root
from runtime.sync import Sync


def run_exec_child(request: Request, sync: Sync, ns_fds, process) -> None:
    stages = Stages()
    preload(request, stages)
    with stages("fds"):
        close_inherited_fds(request, sync, extra=[fd for _, fd in ns_fds])
    with stages("prctl"):
        linux.set_pdeathsig(signal.SIGKILL)
    if request.cgroup is not None:
        with stages("cgroup"):
            request.cgroup.join_self()
    if denials.enabled():
        with stages("audit session"):
            # Its own session, as PID 1's (run_namespace_child): the shim adds it to the
            # container's, so records of a caller that has exited are still the container's.
            denials.start_session(host_id_of_container_root(request.spec))
    with stages("namespaces"):
        for ns_type, fd in ns_fds:
            linux.setns(fd, linux.NAMESPACE_FLAGS[ns_type])
            os.close(fd)
    channel = None
    if request.anchor_connection is not None:
        from runtime import exec_anchor

        try:
            with stages("exec anchor"):
                channel = _request_from_anchor(request, process)
        except StageError as e:
            if not isinstance(e.cause, exec_anchor.Unanswered):
                raise
            # Nothing of the exec exists: the parent runs it the old way (Container.exec).
            sync.send("anchor-unanswered", why=str(e.cause))
            return
    with stages("fork"):
        pid = os.fork()
    if pid == 0:
        if channel is not None:
            binary = request.anchor_connection[1]
            run_child(sync, lambda: _stand_in(sync, stages, process, channel, binary))
        run_child(sync, lambda: _exec_process(request, sync, stages, process))
    sync.send("pid", pid=pid)


def _request_from_anchor(request: Request, process) -> int:
    """Ask the container's anchor for the exec (runtime/exec_anchor.py), from here: host
    root outside the container's pid namespace, the only sender it serves. Returns the
    stand-in's end of the reply channel; the stand-in then holds none of the stdio.
    exec_anchor.Unanswered (before any pty went to the caller's console socket) when
    the anchor did not take it."""
    from runtime import console, exec_anchor

    terminal = process.terminal and request.console_fd is not None
    connected = request.anchor_connection[0]
    try:
        channel = exec_anchor.send_request(connected, process, terminal)
    finally:
        os.close(connected)
    try:
        anchor_dir = request.anchor_connection[2]
        try:
            exec_anchor.await_ready(channel, anchor_dir)
        finally:
            if anchor_dir >= 0:
                os.close(anchor_dir)  # a host /proc directory: not for the stand-in
        if terminal:
            # The pty in the container's devpts, as setup_stdio makes it for the old path.
            slave = console.make_pty_and_send(request.console_fd)
            stdio = (slave, slave, slave)
        else:
            stdio = request.stdio
        try:
            exec_anchor.send_stdio(channel, stdio)
        finally:
            close_all(set(stdio))
    except BaseException:
        os.close(channel)
        raise
    null = os.open("/dev/null", os.O_RDWR)  # the container's: the stand-in is in its mounts
    for target in (0, 1, 2):
        if target != null:
            os.dup2(null, target)
    if null > 2:
        os.close(null)
    return channel


def _stand_in(sync: Sync, stages: "Stages", process, channel: int, binary: int) -> None:
    """The exec as its caller knows it (pid, exit status, signals) while the anchor's
    child runs it inside PID 1's Landlock domain."""
    from runtime import exec_anchor

    with stages("prctl"):
        # Host root in the container's pid namespace: the workload must not read it.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
    sync.send("ready")
    sync.expect("start")
    with stages("exec"):
        exec_anchor.stand_in(channel, binary, process, ready=sync.close)


def _exec_process(request: Request, sync: Sync, stages: "Stages", process) -> None:
    with stages("terminal"):
        setup_stdio(request, process)
    plan = prepare_process(request, stages, process)
    finish_process(request, sync, stages, process, plan, wait_for_fifo=None)
