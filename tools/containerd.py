"""A private containerd for tests and benchmarks: own config, root, state and socket.

It never touches the host's /run/containerd or /var/lib/containerd, so it can run
beside any other containerd, and several can run at once (one per temp dir).
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from runtime.node.containerd import CRI_PLUGIN, containerd_version
from shim import config as shim_config
from tools.netns import entering

NAMESPACE = "zviz-test"
# Set by integration/conftest.py (see integration/ids.py): a test session's tag, put in
# the base directory and namespace so that its containers' mounts and cgroups carry it.
SESSION_TAG = "ZVIZ_TEST_TAG"
ZVIZ_SHIM = "containerd-shim-zviz-v2"
VENV_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin")

RUNC_RUNTIME = "io.containerd.runc.v2"


def lost_by_runcs_shim(runtime: str, result) -> bool:
    """Whether a finished `ctr run`/`ctr task exec` of `runtime` shows the known output
    loss of containerd's runc shim: an empty stdout (the exit status intact) when ctr's
    reader of the stdout fifo is late (its Delete does not wait for the reader: 4-8 of
    400 concurrent execs here, docs/reliability.md). Never true for another runtime: zviz's
    shim must deliver every line, and a test judges it as it came."""
    return runtime == RUNC_RUNTIME and result.stdout == ""


def log_lost_by_runcs_shim(runtime: str, lines: list[str], stdout_lines: list[str]) -> bool:
    """Whether a file:// log of a finished `ctr run` of `runtime` shows the other known
    loss of containerd's runc shim: its stdout lines alone, the stderr ones gone. Both
    streams are copied from pipes into the one file, and copyPipes hands the stdout copy
    the file itself rather than its counting closer, so the stdout copy's end closes the
    file while the stderr copy may still hold data (1.6 and 2.4.2 share that code; a
    two-line script lost its stderr line in 8 of 180 runs under 1.6's shim here, 0 of 100
    under 2.4.2's, and once in a `make test` run under 2.4.2's). zviz gives the process
    the file itself: nothing is copied, nothing can be lost, and a test judges its log as
    it came."""
    return runtime == RUNC_RUNTIME and sorted(lines) == sorted(stdout_lines)


CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "{level}"

[plugins."io.containerd.runtime.v1.linux"]
  shim_debug = true
"""

# Kubernetes' CRI plugin, as a kubelet's containerd runs it, with zviz as RuntimeClass
# handler `zviz` (and any other handlers given, CRI_ZVIZ_HANDLER each). Offline: the sandbox ("pause") image must be imported before use. CNI
# plugins and network configs are read from {base}/cni (empty unless the caller puts them
# there, as integration/cni_node.py does). The streaming server takes a free port so
# that several of these can run at once.
CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
{zviz_handlers}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/net.d"
"""
# A RuntimeClass handler served by zviz. pod_annotations: the pod annotations containerd
# copies into the OCI spec (it drops all others): the operator's lock on io.zviz.profile.
# ConfigPath reaches the shim as runtimeoptions.v1.Options (`start`'s stdin and
# CreateTaskRequest.options).
CRI_ZVIZ_HANDLER = """
    [plugins."{plugin}".containerd.runtimes.{handler}]
      runtime_type = "io.containerd.zviz.v2"
      pod_annotations = {pod_annotations}
"""
# The CRI's runc handler with another runc than the one on PATH (runc_binary).
CRI_RUNC_OPTIONS = """      [plugins."{plugin}".containerd.runtimes.runc.options]
        BinaryName = {binary}
"""
CRI_ZVIZ_HANDLER_OPTIONS = """
      [plugins."{plugin}".containerd.runtimes.{handler}.options]
        ConfigPath = {config_path}
"""
CRI_NAMESPACE = "k8s.io"

# containerd 2.x reads config version 3: the v1 runtime (and its shim_debug) is gone, and
# the CRI plugin is split into io.containerd.cri.v1.{images,runtime} beside the gRPC
# service io.containerd.grpc.v1.cri, which keeps only the streaming server's settings.
CONFIG_V3 = """version = 3
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "{level}"
"""
CRI_PLUGINS_V3 = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.runtime",
    "io.containerd.cri.v1.images",
    "io.containerd.podsandbox.controller.v1.podsandbox",
)
CRI_CONFIG_V3 = """
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox_image}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
{runc_options}{zviz_handlers}
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{base}/cni/bin"]
    conf_dir = "{base}/cni/net.d"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def major_version(containerd_bin: str) -> int:
    """containerd's major version from `containerd --version` (runtime/node/containerd.py)."""
    version = containerd_version(containerd_bin)
    if version is None:
        raise RuntimeError(f"{containerd_bin} --version: no containerd version")
    return int(version.split(".")[0])


def cri_zviz_handlers(
    handlers: dict[str, str | None],
    pod_annotations: tuple[str, ...],
    plugin: str,
) -> str:
    """The CRI runtime sections of zviz HANDLERS (name: its shim config file, or None), in
    PLUGIN: the CRI plugin's id in the config's version (CRI_PLUGIN)."""
    sections = []
    for handler, config_path in handlers.items():
        # JSON strings and arrays of strings are valid TOML.
        sections.append(
            CRI_ZVIZ_HANDLER.format(
                plugin=plugin, handler=handler, pod_annotations=json.dumps(pod_annotations)
            )
        )
        if config_path:
            sections.append(
                CRI_ZVIZ_HANDLER_OPTIONS.format(
                    plugin=plugin, handler=handler, config_path=json.dumps(config_path)
                )
            )
    return "".join(sections)


class PrivateContainerd:
    def __init__(
        self,
        base_dir: str | None = None,
        debug: bool = True,
        cri_sandbox_image: str | None = None,
        netns: str | None = None,
        cri_handlers: dict[str, str | None] | None = None,
        cri_pod_annotations: tuple[str, ...] = (),
        containerd_bin: str = "containerd",
        ctr_bin: str = "ctr",
        shim_dir: str = VENV_BIN,
        runc_binary: str | None = None,
        root_dir: str | None = None,
        umask: int | None = None,
    ):
        tag = os.environ.get(SESSION_TAG, "")
        # Short base path: shim socket paths must stay under 108 bytes.
        self.base = base_dir or tempfile.mkdtemp(prefix=f"zc-{tag}-" if tag else "zc-", dir="/run")
        # 0711 as containerd's own directories: a container whose root is mapped to an
        # unprivileged uid (every zviz profile) must traverse it to reach its rootfs.
        os.chmod(self.base, 0o711)
        # containerd's root (content store, snapshots) defaults to the base, under /run: a
        # tmpfs on most machines, too small for big images; ROOT_DIR puts it on a disk.
        self.root = root_dir or os.path.join(self.base, "root")
        self.state = os.path.join(self.base, "state")
        self.address = os.path.join(self.base, "c.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = os.path.join(self.base, "config.toml")
        self.log_path = os.path.join(self.base, "containerd.log")
        self.namespace = f"{NAMESPACE}-{tag}" if tag else NAMESPACE
        self.debug = debug
        # The CRI plugin is loaded only when given the image of its sandboxes.
        self.cri_sandbox_image = cri_sandbox_image
        # zviz's RuntimeClass handlers: name -> the shim config its runtime options name.
        self.cri_handlers = cri_handlers if cri_handlers is not None else {"zviz": None}
        self.cri_pod_annotations = tuple(cri_pod_annotations)
        # A network namespace (path) for containerd, and so for its shims, CNI plugins and
        # every pod network it makes; None: the caller's.
        self.netns = netns
        # Debian's 1.6 by default; tools/gotools.py builds a 2.x (config version 3).
        self.containerd_bin = containerd_bin
        self.ctr_bin = ctr_bin
        # The CRI runc handler's runc (BinaryName); None: runc from PATH. Config version 3
        # only: test_containerd2_cri.py's reference needs a runc newer than Debian's.
        self.runc_binary = runc_binary
        # The umask containerd runs with, and so its shims (an operator's service with
        # UMask=0027, as CIS benchmarks ask); None: the caller's.
        self.umask = umask
        self.major_version = major_version(containerd_bin)
        self.proc: subprocess.Popen | None = None
        # containerd finds shims on PATH: zviz's in SHIM_DIR (the checkout's venv, or an
        # install under test), then those beside the chosen containerd binary (a 2.x
        # brings its own runc shim: tools/gotools.py says why), then the caller's PATH
        # without any other zviz shim, so that SHIM_DIR's is the only one containerd finds.
        self.shim_dir = shim_dir
        inherited = [
            entry
            for entry in os.environ.get("PATH", "/usr/bin:/bin").split(":")
            if not os.path.exists(os.path.join(entry, ZVIZ_SHIM))
        ]
        path = [shim_dir, *inherited]
        if os.path.dirname(containerd_bin):
            path.insert(1, os.path.dirname(containerd_bin))
        self.env = dict(os.environ, PATH=":".join(path))

    def start(self, timeout: float = 30) -> "PrivateContainerd":
        os.makedirs(self.base, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(self.config_text())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.containerd_bin, "--config", self.config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=self._preexec(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.proc.returncode}; see {self.log_path}"
                )
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not answer within {timeout}s; see {self.log_path}")

    def _preexec(self):
        """The daemon's preexec_fn: its network namespace and umask, each when given."""
        enter = entering(self.netns) if self.netns else None
        if enter is None and self.umask is None:
            return None

        def prepare() -> None:
            if enter is not None:
                enter()
            if self.umask is not None:
                os.umask(self.umask)

        return prepare

    def config_text(self) -> str:
        """The config file, in the version this containerd reads (2 for 1.x, 3 for 2.x)."""
        v3 = self.major_version >= 2
        cri_plugins = CRI_PLUGINS_V3 if v3 else (CRI_PLUGIN[2],)
        config = (CONFIG_V3 if v3 else CONFIG).format(
            root=self.root,
            state=self.state,
            address=self.address,
            level="debug" if self.debug else "info",
            disabled="" if self.cri_sandbox_image else ", ".join(f'"{p}"' for p in cri_plugins),
        )
        if self.cri_sandbox_image:
            cri = CRI_CONFIG_V3 if v3 else CRI_CONFIG
            handlers = cri_zviz_handlers(
                self.cri_handlers, self.cri_pod_annotations, CRI_PLUGIN[3 if v3 else 2]
            )
            runc_options = ""
            if self.runc_binary:
                if not v3:
                    raise ValueError("runc_binary: only with containerd 2.x (config version 3)")
                runc_options = CRI_RUNC_OPTIONS.format(
                    plugin=CRI_PLUGIN[3], binary=json.dumps(self.runc_binary)
                )
            config += cri.format(
                sandbox_image=self.cri_sandbox_image,
                base=self.base,
                zviz_handlers=handlers,
                runc_options=runc_options,  # version 2's template has no place for it
            )
        return config

    def ctr(self, *args, check: bool = True, timeout: float = 60, input=None, namespace=None):
        cmd = [self.ctr_bin, "--address", self.address, "-n", namespace or self.namespace, *args]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
            env=self.env,
        )

    def restart(self) -> None:
        """Stop containerd alone (shims keep running) and start it again on the same state."""
        self._stop_daemon()
        self.start()

    def _stop_daemon(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup_tasks(self) -> None:
        """Kill and delete every task and container this containerd knows of, in every namespace."""
        namespaces = self.ctr("namespaces", "ls", "-q", check=False).stdout.split()
        for ns in namespaces:
            for task in self.ctr("tasks", "ls", "-q", check=False, namespace=ns).stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, namespace=ns)
                self.ctr("tasks", "delete", "-f", task, check=False, namespace=ns, timeout=30)
            for container in self.ctr(
                "containers", "ls", "-q", check=False, namespace=ns
            ).stdout.split():
                self.ctr("containers", "delete", container, check=False, namespace=ns)

    def stop(self, remove: bool = True) -> None:
        namespaces = {self.namespace}
        if self.cri_sandbox_image:
            namespaces.add(CRI_NAMESPACE)
        if self.proc and self.proc.poll() is None:
            # Callers may have used other namespaces (`ctr -n`): each has its cgroup parent.
            namespaces.update(self.ctr("namespaces", "ls", "-q", check=False).stdout.split())
            self.cleanup_tasks()
        self._stop_daemon()
        self._remove_namespace_cgroups(namespaces)
        self._remove_shim_runtime_roots(namespaces)
        if remove:
            for directory in {self.base, self.root}:
                self._unmount_under(directory)
                shutil.rmtree(directory, ignore_errors=True)

    def _remove_shim_runtime_roots(self, namespaces) -> None:
        """zviz's shim keeps its containers' state in a root per (containerd address,
        namespace) that outlives its daemons (a node's containerd keeps its address: a
        few directories, made once). Every private containerd has an address of its own,
        so without this each left two empty directories (1507 of them after a few days of
        test runs). Only empty ones are removed: anything left in them is a leak to report."""
        roots = {shim_config.runtime_root(self.address, namespace) for namespace in namespaces}
        for directory in [*roots, *{os.path.dirname(root) for root in roots}]:
            try:
                os.rmdir(directory)
            except OSError:
                pass  # absent, or not empty (the leak check reports what is in it)

    @staticmethod
    def _remove_namespace_cgroups(namespaces) -> None:
        """ctr puts tasks in /<namespace>/<id>; runtimes remove <id>, the empty parent is ours."""
        # "": the v2 tree at /sys/fs/cgroup itself; the others: each v1 hierarchy
        for hierarchy in ["", *os.listdir("/sys/fs/cgroup")]:
            for namespace in namespaces:
                try:
                    os.rmdir(os.path.join("/sys/fs/cgroup", hierarchy, namespace))
                except OSError:
                    pass  # absent, not a hierarchy, or in use (then the leak check reports it)

    @staticmethod
    def _unmount_under(path: str) -> None:
        """Unmount whatever is still mounted below PATH (snapshots, shim rootfs), deepest first."""
        with open("/proc/self/mountinfo") as f:
            targets = [line.split()[4] for line in f]
        for target in sorted((t for t in targets if t.startswith(path + "/")), reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)

    def import_image(self, archive: str, namespace: str | None = None) -> None:
        self.ctr("images", "import", "--all-platforms", archive, timeout=120, namespace=namespace)


def runsc_wrapper(directory: str) -> str:
    """A runc-compatible wrapper around runsc, for containerd's runc shim (`--runc-binary`)."""
    path = os.path.join(directory, "runsc-wrapper")
    with open(path, "w") as f:
        f.write('#!/bin/sh\nexec runsc --network=none --ignore-cgroups "$@"\n')
    os.chmod(path, 0o755)
    return path
