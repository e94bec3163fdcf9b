"""The sync channel's messages are declared once (runtime/spawn/messages.py), and the code
sends and expects exactly those: a misspelt kind or a missing field fails at once."""

import ast
import json
import os
import pathlib

import pytest

from runtime import errors
from runtime.spawn.messages import MESSAGES, TO_CHILD, TO_PARENT, MessageError
from runtime.sync import Sync

RUNTIME = pathlib.Path(__file__).resolve().parent.parent / "runtime"


@pytest.fixture
def ends():
    parent, child = Sync.pair()
    yield parent, child
    parent.close()
    child.close()


def test_a_declared_message_goes_through(ends):
    parent, child = ends
    child.send("log", level="info", msg="hello")
    assert parent.recv(timeout=5) == {"type": "log", "level": "info", "msg": "hello"}
    parent.send("joined")
    assert child.expect("joined") == {"type": "joined"}


@pytest.mark.parametrize(
    "kind, fields, complaint",
    [
        ("redy", {}, "no message 'redy' is declared"),
        ("pid", {}, "'pid' without its field 'pid'"),
        ("pid", {"pid": 7, "tid": 7}, "'pid' has no field 'tid'"),
        ("pid", {"pid": "7"}, "field 'pid': str is not int"),
        ("pid", {"pid": True}, "field 'pid': bool is not int"),
        ("start", {}, "'start' is sent parent → child"),
    ],
)
def test_a_wrong_message_is_refused_before_it_is_sent(ends, kind, fields, complaint):
    parent, child = ends
    with pytest.raises(MessageError, match=complaint):
        child.send(kind, **fields)
    with pytest.raises(errors.FailedPrecondition, match="no word"):  # nothing went out
        parent.recv(timeout=0)


def test_fds_ride_only_on_the_message_declared_to_carry_them(ends):
    parent, child = ends
    r, w = os.pipe()
    try:
        with pytest.raises(MessageError, match="carries no file descriptors"):
            parent.send_fds("joined", [r])
        with pytest.raises(MessageError, match="carries file descriptors"):
            parent.send("mapped", idmapped=True)
        with pytest.raises(MessageError, match="carries no file descriptors"):
            parent.send_fds("mapped", [r])  # not id-mapped: no fd rides along
        parent.send("mapped")  # the 6.1 guest's path (no id-mapped mounts): no fd
        assert child.expect("mapped") == {"type": "mapped"}
    finally:
        os.close(r)
        os.close(w)


def test_expect_names_a_declared_message_of_the_other_direction(ends):
    parent, child = ends
    with pytest.raises(MessageError, match="no message 'strat' is declared"):
        child.expect("strat")
    with pytest.raises(MessageError, match="not sent to this end"):
        parent.expect("start")


def test_an_undeclared_message_received_is_refused(ends):
    parent, child = ends
    os.write(child.fd, json.dumps({"type": "pdi", "pid": 1}).encode())
    with pytest.raises(MessageError, match="no message 'pdi'"):
        parent.recv(timeout=5)


def test_every_message_has_a_direction_and_a_meaning():
    for kind, message in MESSAGES.items():
        assert message.kind == kind
        assert message.direction in (TO_CHILD, TO_PARENT)
        assert message.meaning
        assert not set(message.required) & set(message.optional)


# --- the protocol as the code uses it -------------------------------------------------


def _kinds_in(node) -> set[str]:
    """The string constants `node` can evaluate to: "ack" if x else "start" is both."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _kinds_in(node.body) | _kinds_in(node.orelse)
    return set()


def _is_message_type(node) -> bool:
    """`kind`, `message["type"]` or `message.get("type")`."""
    if isinstance(node, ast.Name):
        return node.id == "kind"
    if isinstance(node, ast.Subscript):
        return _kinds_in(node.slice) == {"type"}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "get" and node.args and _kinds_in(node.args[0]) == {"type"}
    return False


def _receives_from_the_channel(path: pathlib.Path) -> bool:
    """The files where a comparison with `kind` or message["type"] is about the channel."""
    return path.parent == RUNTIME / "spawn" or path == RUNTIME / "sync.py"


def _protocol():
    """(kind -> [(file:line, keyword names or None)] sent, kinds received), over runtime/."""
    sent: dict[str, list] = {}
    received: set[str] = set()
    for path in sorted(RUNTIME.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        channel = (
            path.parent == RUNTIME / "spawn"
            or path.parent == RUNTIME
            and _receives_from_the_channel(path)
        )
        for node in ast.walk(tree):
            where = f"{path.relative_to(RUNTIME.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                method = node.func.attr
                names = None
                if not any(k.arg is None for k in node.keywords):  # no **fields
                    names = {k.arg for k in node.keywords}
                if method in ("send", "send_fds"):
                    for kind in _kinds_in(node.args[0]):
                        sent.setdefault(kind, []).append((where, names))
                elif method == "expect":
                    received |= _kinds_in(node.args[0])
            elif channel and isinstance(node, ast.Compare) and len(node.comparators) == 1:
                left, right = node.left, node.comparators[0]
                if _is_message_type(left):
                    received |= _kinds_in(right)
                elif _is_message_type(right):
                    received |= _kinds_in(left)
    return sent, received


def test_every_kind_sent_or_received_is_declared_and_every_declared_kind_is_used():
    sent, received = _protocol()
    assert set(sent) <= set(MESSAGES), f"sent but not declared: {set(sent) - set(MESSAGES)}"
    assert received <= set(MESSAGES), f"received but not declared: {received - set(MESSAGES)}"
    assert set(MESSAGES) <= set(sent), f"declared, never sent: {set(MESSAGES) - set(sent)}"
    assert set(MESSAGES) <= received, f"declared, never received: {set(MESSAGES) - received}"


def test_every_send_names_the_declared_fields():
    sent, _ = _protocol()
    for kind, uses in sent.items():
        message = MESSAGES[kind]
        for where, names in uses:
            if names is None:
                continue
            assert names <= set(message.required) | set(message.optional), (where, names)
            assert set(message.required) <= names, (where, names)
