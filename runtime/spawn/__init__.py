"""Spawning: the processes that become a container (init) or enter one (exec), as stages.

parent.py           the runtime process: fork, answering the children, the wait for
                    pid and ready, the kill and reap on error
namespace_child.py  cgroup, setns/unshare, the id maps handshake, the fork of PID 1
init.py             PID 1: rootfs, process attributes, ready, wait for start,
                    security, the exec anchor's fork, execve
exec.py             an exec: through the container's exec anchor, or forked here
common.py           what they share: the Request, how a child reports and leaves
sysctl.py           linux.sysctl, by PID 1 or (a joined netns) by the parent
messages.py         every message of the sync channel between them (runtime/sync.py)
"""
