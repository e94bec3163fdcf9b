"""Running a workload image through containerd under zviz and under runc, side by side.

Each test of the suite runs once per runtime (the `runtime` fixture): runc is the
reference, zviz runs the same command under the profile docs/profiles.md recommends for
that kind of software. Containers are named through integration/ids.py and removed after.
"""

import os
import subprocess
import time

from integration.ids import unique_id

RUNTIMES = {"runc": "io.containerd.runc.v2", "zviz": "io.containerd.zviz.v2"}


class Workloads:
    def __init__(self, containerd, runtime: str, log_dir: str):
        self.containerd = containerd
        self.runtime = runtime
        self.log_dir = log_dir
        self.containers: list[str] = []

    def run(
        self,
        image: str,
        args: list[str],
        profile: str,
        netns: str | None = None,
        mounts: tuple[str, ...] = (),
        detach: bool = False,
        timeout: float = 300,
    ) -> tuple[str, subprocess.CompletedProcess]:
        """`ctr run` of IMAGE with ARGS: zviz under PROFILE, runc as it is; in the network
        namespace at NETNS (else the new one ctr makes: loopback only). MOUNTS: ctr
        `--mount` values. Detached, the output goes to self.log(container)."""
        container_id = unique_id(f"zviz-wl-{self.runtime}")
        options = ["--runtime", RUNTIMES[self.runtime]]
        if self.runtime == "zviz":
            options += ["--annotation", f"io.zviz.profile={profile}"]
        if netns:
            options += ["--with-ns", f"network:{netns}"]
        for mount in mounts:
            options += ["--mount", mount]
        if detach:
            options += ["-d", "--log-uri", f"file://{self.log_path(container_id)}"]
        else:
            options += ["--rm"]
        self.containers.append(container_id)
        result = self.containerd.ctr(
            "run", *options, image, container_id, *args, check=False, timeout=timeout
        )
        return container_id, result

    def exec(self, container_id: str, args: list[str], timeout: float = 300):
        return self.containerd.ctr(
            "task", "exec", "--exec-id", unique_id("exec")[-20:], container_id, *args,
            check=False, timeout=timeout,
        )  # fmt: skip

    def log_path(self, container_id: str) -> str:
        return os.path.join(self.log_dir, f"{container_id}.log")

    def log(self, container_id: str) -> str:
        try:
            with open(self.log_path(container_id), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def running(self, container_id: str) -> bool:
        listing = self.containerd.ctr("tasks", "ls", check=False).stdout
        return any(
            line.split()[:1] == [container_id] and "RUNNING" in line
            for line in listing.splitlines()
        )

    def wait_for(self, container_id: str, check, what: str, timeout: float = 60):
        """Poll CHECK() until it returns a true value; fail with the container's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if not self.running(container_id) or time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not within {timeout}s under {self.runtime} "
                    f"(running: {self.running(container_id)}); log:\n{self.log(container_id)}"
                )
            time.sleep(0.2)

    def remove_all(self) -> None:
        for container_id in self.containers:
            ctr = self.containerd.ctr
            ctr("tasks", "kill", "-a", "-s", "SIGKILL", container_id, check=False)
            ctr("tasks", "delete", "-f", container_id, check=False, timeout=30)
            ctr("containers", "delete", container_id, check=False)
