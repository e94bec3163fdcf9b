"""Marks for fast tests that need root: skipped with the reason when run as another user.

tests/ is meant to run as any user (`make test-fast`); what only root may do (drop
capabilities from the bounding set, unshare a mount namespace) is skipped with the
operation named, never failed. integration/ needs root throughout and refuses to start
without it (integration/conftest.py).
"""

import os

import pytest

IS_ROOT = os.geteuid() == 0


def needs_root(operation: str):
    return pytest.mark.skipif(not IS_ROOT, reason=f"needs root: {operation}")


# The security layers' confined child drops capabilities from its bounding set first
# (prctl PR_CAPBSET_DROP needs CAP_SETPCAP), as a container's init does.
drops_capabilities = needs_root("the confined child drops capabilities (PR_CAPBSET_DROP)")
# Mount tests work in a private mount namespace (unshare(CLONE_NEWNS) needs CAP_SYS_ADMIN).
mounts_in_own_namespace = needs_root("mounts in a private mount namespace (unshare CLONE_NEWNS)")
# Profile files the runtime loads by name must be root-owned on a path of root-owned
# directories: only root can make one (a root-owned directory under /run).
writes_root_owned_profiles = needs_root("writes root-owned profile files under /run")
# The broker resolves egress_hosts names in the caller's socket's network namespace,
# which it opens with ioctl SIOCGSKNS (CAP_NET_ADMIN over that namespace).
opens_a_sockets_netns = needs_root("opens a socket's network namespace (SIOCGSKNS)")
