"""Helpers for the tests that drive the `zviz` CLI against the real kernel."""

import glob
import json
import os
import subprocess
import tempfile

from integration.ids import unique_id
from runtime import cgroups


def edit_config(bundle: str, change) -> dict:
    """Apply `change(config)` to the bundle's config.json; returns the new config."""
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return config


class Zviz:
    """Runs `zviz --root <root> ...`; every test gets its own root."""

    def __init__(self, binary: str, root: str):
        self.binary = binary
        self.root = root

    def __call__(
        self, *args, check: bool = False, timeout: float = 60, input=None, log=None, **kwargs
    ):
        base = [self.binary, "--root", self.root]
        if log:
            base += ["--log", log, "--log-format", "json"]
        return subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
            **kwargs,
        )

    def create(
        self, bundle: str, container_id: str, *extra, stdout=None
    ) -> subprocess.CompletedProcess:
        """`zviz create`: PID 1 keeps the command's stdio, so it must not be a pipe we wait on."""
        with tempfile.TemporaryFile("w+") as err:
            result = subprocess.run(
                [
                    self.binary,
                    "--root",
                    self.root,
                    "create",
                    "--bundle",
                    bundle,
                    *extra,
                    container_id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                stderr=err,
                timeout=60,
            )
            err.seek(0)
            result.stderr = err.read()
        return result

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            [self.binary, "--root", self.root, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def state(self, container_id: str) -> dict:
        result = self("state", container_id)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def run(
        self, bundle: str, container_id: str | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        return self("run", "--bundle", bundle, container_id or unique_id(), **kwargs)


def leftovers(container_id: str, root: str) -> list[str]:
    """Anything of this container still on the host: state dir, cgroups, processes."""
    found = []
    if os.path.exists(os.path.join(root, container_id)):
        found.append(f"state dir {os.path.join(root, container_id)}")
    # where zviz puts a container's group by default, in every hierarchy this host has
    for path in cgroups.for_container(container_id).paths.values():
        if os.path.isdir(path):
            found.append(f"cgroup {path}")
    return found


def remove_test_slices(pod_slice: str) -> None:
    """rmdir zviztest.slice/<pod_slice> and zviztest.slice in every hierarchy.

    They stand for the kubelet's systemd slices, which zviz leaves alone, so the tests
    that make them remove them.
    """
    # v1: one tree per hierarchy below /sys/fs/cgroup; v2: the tree at /sys/fs/cgroup
    for top in ["/sys/fs/cgroup", *glob.glob("/sys/fs/cgroup/*/")]:
        for level in (f"zviztest.slice/{pod_slice}", "zviztest.slice"):
            try:
                os.rmdir(os.path.join(top, level))
            except OSError:
                pass
