"""Build the embedded default bundle: a busybox rootfs from Debian's busybox-static.

No registry is reachable, so every image zviz's demo, tests and benchmarks use is
built here from files on this machine.

    python -m tools.mkbundle DIR [--demo] [-- ARGS...]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

from runtime.defaults import default_config

BUSYBOX = "/bin/busybox"

# What the demo prints: the container's own view of itself.
DEMO_SCRIPT = r"""
echo "== zviz demo: what the container sees =="
echo "pid:        $$ (PID 1 of a fresh pid namespace when this says 1)"
echo "hostname:   $(hostname)"
echo "uid/gid:    $(id)"
echo "processes:"; ps -o pid,user,comm | sed 's/^/  /'
echo "mounts:"; sed 's/^/  /' /proc/self/mounts
echo "cgroup:     $(cat /proc/self/cgroup | tr '\n' ' ')"
for f in /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max \
         /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max; do
  [ -r "$f" ] && echo "limit:      $f = $(cat $f)"
done
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|Seccomp_filters)' /proc/self/status | sed 's/^/  /'
echo "uid_map:    $(cat /proc/self/uid_map | tr -s ' ')   (container uid, host uid, count)"
echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
echo "== end =="
"""


def build_rootfs(rootfs: str) -> None:
    """A minimal rootfs: busybox and its applets, /etc files, and empty mount points."""
    if not os.path.exists(BUSYBOX):
        sys.exit(f"mkbundle: {BUSYBOX} is missing: apt-get install busybox-static")
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "proc",
        "sys",
        "dev",
        "root",
        "var",
        "run",
    ):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin/busybox"))
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True)
    for applet in applets.stdout.split():
        link = os.path.join(rootfs, applet)
        if not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": "zviz\n",
        "etc/hosts": "127.0.0.1 localhost\n",
    }
    for name, text in files.items():
        with open(os.path.join(rootfs, name), "w") as f:
            f.write(text)


def build_bundle(bundle: str, args=("sh",), terminal: bool = False, **config_overrides) -> str:
    """Create (or refresh) BUNDLE with rootfs/ and config.json; returns the bundle path."""
    os.makedirs(bundle, exist_ok=True)
    build_rootfs(os.path.join(bundle, "rootfs"))
    config = default_config(args=args, terminal=terminal)
    config.update(config_overrides)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return bundle


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--demo", action="store_true", help="run the demo script as the process")
    parser.add_argument("args", nargs="*", default=["sh"])
    opts = parser.parse_args(argv)
    args = ["/bin/sh", "-c", DEMO_SCRIPT] if opts.demo else opts.args
    extra = {}
    if opts.demo:
        config = default_config()
        config["linux"]["resources"].update(
            {"memory": {"limit": 256 * 1024 * 1024}, "pids": {"limit": 128}}
        )
        extra["linux"] = config["linux"]
    build_bundle(opts.bundle, args=args, **extra)
    print(opts.bundle)


if __name__ == "__main__":
    main()
