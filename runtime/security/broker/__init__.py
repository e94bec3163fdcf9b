"""The broker: the supervisor side of seccomp user notification.

It answers two kinds of notification from a container's filter:
- mediated calls (connect, bind, sendto with an address, sendmsg, sendmmsg): the
  broker copies the arguments out of the caller's memory, decides on its own copy
  against the profile's egress/bind rules, and performs the call itself on the
  caller's socket (fetched with pidfd_getfd) with the copied arguments. It never
  answers SECCOMP_USER_NOTIF_FLAG_CONTINUE, so a caller rewriting its memory after
  the decision changes nothing.
- denied calls under --verbose: logged as one JSON line each and answered EPERM.

Fail closed: any error while handling a call answers EPERM. If the broker dies, the
kernel answers every pending and future notified call with ENOSYS. A stall ends in an
error too, within the profile's `broker.timeout` (T):
- a call the broker has received but not started performing by its deadline (receipt
  + T) is answered ETIMEDOUT by a watchdog thread; the worker, when it gets there,
  sees the call answered and does nothing;
- a call being performed is bounded by the same deadline on the broker's side: a
  connect runs non-blocking and, if not finished in time, is aborted (connect to
  AF_UNSPEC) before ETIMEDOUT is answered, so the caller's socket cannot connect
  later; sends wait for room only until the deadline;
- a whole-broker stall (stopped, deadlocked) leaves the calls unreceived in the kernel:
  the warden, a small child process forked before the broker holds the listener
  (warden.py: it execs the static runtime/broker_warden.c),
  expects a heartbeat from the watchdog thread at least every T once the broker
  serves, and SIGKILLs the broker otherwise, which closes the listener (ENOSYS for
  every pending call).

One broker process per container that needs one (`spawn`), double-forked so it is
nobody's child to reap; it exits when the last task using the filter has gone.
The same `Broker` class can run inside a long-lived supervisor on a thread
(`Broker(listener_fd, ...).serve()`) if one prefers.

The modules, as a chain of handlers (crun's seccomp-notify shape):
- core.py: the notify loop, deadlines and watchdog; turns whatever a handler
  ends with into one Verdict and answers it (fail closed), with its records.
- handlers.py: one handler per mediated call (connect, bind, sendto, sendmsg,
  sendmmsg): copy, decide, perform, return a Verdict (verdict.py).
- policy.py: the decisions, pure functions of the profile and the decoded arguments
  (no syscalls: unit-tested without root in tests/test_broker_policy.py).
- addresses.py: the policy applied to an address, with the facts it asks looked up.
- caller.py: the caller's memory, fds, /proc and credentials; performing by the deadline.
- sockets.py: what the kernel says about a socket and who holds it.
- egress_hosts.py: egress_hosts' names, resolved in the caller's network namespace.
- process.py: the broker process (spawn) and its setup.
"""

from runtime.security.broker.core import Broker, CopyBudget, Notification
from runtime.security.broker.process import spawn
from runtime.security.broker.verdict import Denied, Verdict

__all__ = ["Broker", "CopyBudget", "Denied", "Notification", "Verdict", "spawn"]
