"""The node's audit reader's routing and wire (shim/audit_reader.py); the process itself,
its replacement and the daemons' fallback run in integration/reliability/."""

import socket

from runtime import denials
from shim import audit_reader
from tests.test_denials import LANDLOCK_EVENT, UNSHARE


def _daemon(router: audit_reader.Router, sessions: set[int]):
    reader_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader_end.setblocking(False)
    daemon_end.setblocking(False)
    client = audit_reader.Client(reader_end)
    router.add(client)
    router.subscribe(client, sessions)
    return client, audit_reader.NodeReaderClient(daemon_end)


def test_records_go_to_the_daemon_of_their_session_the_rest_to_every_daemon():
    router = audit_reader.Router()
    _, first = _daemon(router, {7})
    _, second = _daemon(router, {8})
    router.route(denials.AUDIT_SECCOMP, UNSHARE)  # ses=7
    unknown = UNSHARE.replace("ses=7", "ses=9")  # an exec whose daemon has not said yet
    router.route(denials.AUDIT_SECCOMP, unknown)
    router.route(1327, "audit(1.000:1): proctitle=00")  # no daemon reads it
    assert router.flush() == []
    assert first.read() == [(denials.AUDIT_SECCOMP, UNSHARE), (denials.AUDIT_SECCOMP, unknown)]
    assert second.read() == [(denials.AUDIT_SECCOMP, unknown)]
    assert (router.routed, router.broadcast) == (1, 1)


def test_a_landlock_event_goes_whole_to_the_session_of_its_syscall_record():
    router = audit_reader.Router()
    _, owner = _daemon(router, {7})
    _, other = _daemon(router, {8})
    for kind, text in LANDLOCK_EVENT:
        router.route(kind, text)
    router.flush()
    assert owner.read() == LANDLOCK_EVENT[:3]  # access, domain, syscall (EOE: not needed)
    assert other.read() == []
    # Without a SYSCALL record, its domain decides: every daemon gets it after the wait.
    now = [0.0]
    router.clock = lambda: now[0]
    router.route(*LANDLOCK_EVENT[0])
    router.expire()
    now[0] = denials.LANDLOCK_EVENT_SECONDS
    router.expire()
    router.flush()
    assert owner.read() == other.read() == LANDLOCK_EVENT[:1]


def test_what_a_full_daemon_socket_drops_is_counted_and_told():
    router = audit_reader.Router()
    client, daemon = _daemon(router, {7})
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # full soon
    sent = 0
    while True:  # fill the daemon's socket
        router.route(denials.AUDIT_SECCOMP, UNSHARE)
        sent += 1
        router.flush()
        if client.unreported_lost:
            break
    assert client.unreported_lost == 1
    received = len(daemon.read())
    assert received == sent - 1
    router.route(denials.AUDIT_SECCOMP, UNSHARE)
    router.flush()  # room again: the count goes with the next datagram
    assert daemon.read() == [(denials.AUDIT_SECCOMP, UNSHARE)]
    assert daemon.lost == 1 and client.unreported_lost == 0


def test_a_closed_reader_is_told_after_its_last_records():
    router = audit_reader.Router()
    client, daemon = _daemon(router, {7})
    router.route(denials.AUDIT_SECCOMP, UNSHARE)
    router.flush()
    client.sock.close()
    assert daemon.read() == [(denials.AUDIT_SECCOMP, UNSHARE)]
    try:
        daemon.read()
    except audit_reader.ReaderGone:
        pass
    else:
        raise AssertionError("no ReaderGone after the reader closed")
