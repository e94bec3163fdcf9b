"""Names for what the integration tests create, each carrying this session's tag.

integration/conftest.py sets a fresh ZVIZ_TEST_TAG when a session starts. Every container
id, cgroup, containerd base directory and namespace, and temp directory the suite makes
contains it, so the end-of-session leak check (integration/leaks.py) reports this
session's leftovers and only those: not a benchmark's, not another run's beside it.
Child processes inherit the variable, which marks them as this session's too.
"""

import os
import secrets
import uuid

# ZVIZ_TEST_TAG: named where the private containerd (below the test packages) reads it
from tools.containerd import SESSION_TAG as TAG_VARIABLE


def new_session_tag() -> str:
    """Short, without "-" (a systemd slice name treats "-" as a level) and unlikely to clash."""
    return "zt" + secrets.token_hex(4)


def session_tag() -> str:
    tag = os.environ.get(TAG_VARIABLE)
    if not tag:
        # run outside pytest (a helper imported by hand): tag this process on first use
        tag = os.environ[TAG_VARIABLE] = new_session_tag()
    return tag


def tagged(name: str) -> str:
    """A fixed name made this session's: for one-off ids and mkdtemp prefixes."""
    return f"{name}-{session_tag()}"


def unique_id(prefix: str = "zviz-rt") -> str:
    """A container id (also its cgroup's name) unique to this test and tagged with the session."""
    return f"{tagged(prefix)}-{uuid.uuid4().hex[:10]}"
