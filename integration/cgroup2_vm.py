"""Run a host command on a second, real kernel with a pure cgroup v2 hierarchy.

This machine is cgroup v1 and its hierarchies must not be changed, so cgroup v2 code is
proven in a throwaway guest: Debian's kernel (linux-image-amd64) under QEMU with TCG
(this VM's KVM does not boot a stock kernel). The guest's root is the host's "/"
shared read-only over 9p, so the repository and the venv's python are at the same
paths inside; one host directory is shared read-write to bring results back.

    rc, output = run_in_v2_vm("from runtime import cgroups; print(cgroups.for_container('x').version)")

The guest's init mounts cgroup2 at /sys/fs/cgroup and enables cpuset, cpu, io, memory
and pids in the root's cgroup.subtree_control, as systemd does on a v2 host. Python in
the guest runs 15-40x slower than here (TCG), so one script per boot, not pytest.
Based on /work/shared/tools/cgroup2-vm.sh, written out here so the suite needs only
Debian packages (qemu-system-x86, linux-image-amd64, busybox-static, kmod).
"""

import glob
import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile

from integration.ids import tagged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not under /tmp: the guest gets a fresh tmpfs there. Shared by runs: the kernel is
# extracted once.
CACHE_DIR = "/var/tmp/zviz-cg2vm-cache"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# Modules the guest needs for 9p over virtio-pci (the Debian kernel builds them as modules).
NEEDED_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
RESULT_MARK = "@@zviz guest rc="

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for ko in /mods/*.ko; do insmod $ko || echo "@@ insmod $ko failed"; done
H=/mnt/host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host0 $H || echo "@@ 9p mount failed"
mount -t proc proc $H/proc; mount -t sysfs sys $H/sys
# securityfs, as systemd mounts it: the LSMs' files (AppArmor's policy, /sys/kernel/security/lsm)
mount -t securityfs securityfs $H/sys/kernel/security
mount -t cgroup2 -o nsdelegate cgroup2 $H/sys/fs/cgroup
echo "+cpuset +cpu +io +memory +pids" > $H/sys/fs/cgroup/cgroup.subtree_control
mount -t devtmpfs dev $H/dev
# The guest gets fresh tmpfs /tmp and /run; a repository checked out below them (CI may
# clone anywhere) is carried over the new mount so the guest can still import it.
REPO=$(cat /repo_path); mkdir -p /mnt/repo
case "$REPO" in /tmp/*|/run/*) mount --bind $H$REPO /mnt/repo ;; esac
mount -t tmpfs tmp $H/tmp; mount -t tmpfs run $H/run
case "$REPO" in /tmp/*|/run/*) mkdir -p $H$REPO; mount --move /mnt/repo $H$REPO ;; esac
RW=$(cat /rw_path)
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rw0 $H$RW || echo "@@ rw 9p mount failed"
cp /bin/busybox $H/run/busybox; cp /guest_cmd $H/run/guest_cmd
cat > $H/run/stage2 <<'EOS'
/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -c "$(/run/busybox cat /run/guest_cmd)"
echo "@@zviz guest rc=$?"
/run/busybox poweroff -f
EOS
# switch_root, not chroot: a chrooted process cannot unshare a user namespace, and
# pivot_root needs a real mount as /.
exec switch_root $H /run/busybox sh /run/stage2
"""


def _kernel_version() -> str | None:
    images = glob.glob("/boot/vmlinuz-*")
    if not images:
        return None

    def key(path: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path)]

    return os.path.basename(max(images, key=key))[len("vmlinuz-") :]


def missing_requirements() -> str | None:
    """Why the guest cannot boot here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (9p passthrough share of /)"
    if not shutil.which(QEMU):
        return f"{QEMU} not installed (`make deps` installs qemu-system-x86)"
    if _kernel_version() is None:
        return "no /boot/vmlinuz-* (`make deps` installs linux-image-amd64)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} missing (`make deps` installs busybox-static)"
    if not shutil.which("modprobe"):
        return "modprobe (kmod) missing: needed to find the guest's 9p modules"
    return None


def _vmlinux(kver: str) -> str:
    """The uncompressed kernel: direct PVH boot of it saves ~6 s of TCG decompression."""
    path = os.path.join(CACHE_DIR, f"vmlinux-{kver}")
    if os.path.getsize(path) if os.path.exists(path) else 0:
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(f"/boot/vmlinuz-{kver}", "rb") as f:
        image = f.read()
    start = image.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError(f"/boot/vmlinuz-{kver} is not an xz-compressed bzImage")
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR)
    with os.fdopen(fd, "wb") as out:
        out.write(lzma.LZMADecompressor().decompress(image[start:]))
    os.replace(tmp, path)  # atomic: concurrent runs never see half a kernel
    return path


def _modules(kver: str) -> list[str]:
    seen: list[str] = []
    for module in NEEDED_MODULES:
        out = subprocess.run(
            ["modprobe", "--show-depends", "-S", kver, module],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            fields = line.split()
            if fields[:1] == ["insmod"] and fields[1] not in seen:
                seen.append(fields[1])
    return seen


def _cpio_entry(name: str, mode: int, data: bytes = b"") -> bytes:
    """One entry of a "newc" cpio archive (the initramfs format)."""
    encoded = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    pad_name = (4 - (len(header) + len(encoded)) % 4) % 4
    pad_data = (4 - len(data) % 4) % 4
    return header + encoded + b"\0" * pad_name + data + b"\0" * pad_data


def _initramfs(kver: str, guest_cmd: str, rw_path: str) -> bytes:
    entries = []
    for directory in ("bin", "proc", "sys", "dev", "tmp", "mnt", "mnt/host", "mods"):
        entries.append(_cpio_entry(directory, 0o040755))
    with open(BUSYBOX, "rb") as f:
        entries.append(_cpio_entry("bin/busybox", 0o100755, f.read()))
    for i, ko in enumerate(_modules(kver)):
        with open(ko, "rb") as f:
            entries.append(_cpio_entry(f"mods/{i:02d}-{os.path.basename(ko)}", 0o100644, f.read()))
    entries.append(_cpio_entry("init", 0o100755, _INIT.encode()))
    entries.append(_cpio_entry("guest_cmd", 0o100644, guest_cmd.encode() + b"\n"))
    entries.append(_cpio_entry("rw_path", 0o100644, rw_path.encode()))
    entries.append(_cpio_entry("repo_path", 0o100644, REPO.encode()))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    # gzip -1: the 2 MB busybox shrinks; the kernel inflates it faster than TCG copies it
    return gzip.compress(b"".join(entries), compresslevel=1)


class VmRun:
    """What one guest boot produced."""

    def __init__(self, guest_rc: int | None, console: str):
        self.guest_rc = guest_rc  # None: the guest command never reported (crash, timeout)
        self.console = console


def boot(guest_cmd: str, share_rw: str, timeout: float = 110, memory_mib: int = 1024) -> VmRun:
    """Boots the guest, runs `guest_cmd` with /bin/sh in it, powers off.

    `share_rw` (an absolute host directory, not under /tmp) is mounted read-write at
    the same path in the guest.
    """
    reason = missing_requirements()
    if reason:
        raise RuntimeError(f"cannot boot the cgroup v2 guest: {reason}")
    if not os.path.isabs(share_rw) or share_rw.startswith("/tmp/"):
        raise ValueError(f"share_rw must be absolute and outside /tmp: {share_rw}")
    kver = _kernel_version()
    kernel = _vmlinux(kver)
    initrd = os.path.join(share_rw, ".initrd.gz")
    with open(initrd, "wb") as f:
        f.write(_initramfs(kver, guest_cmd, share_rw))
    command = [
        QEMU,
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        str(memory_mib),
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-virtfs",
        "local,path=/,mount_tag=host0,security_model=passthrough,readonly=on,multidevs=remap,id=host0",
        "-virtfs",
        f"local,path={share_rw},mount_tag=rw0,security_model=passthrough,multidevs=remap,id=rw0",
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
    ]
    try:
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as err:
        # subprocess.run killed qemu (our own child) before raising
        console = (err.stdout or b"").decode(errors="replace") + "\n@@ host: timed out"
    finally:
        os.unlink(initrd)
    match = re.search(re.escape(RESULT_MARK) + r"(\d+)", console)
    return VmRun(int(match.group(1)) if match else None, console)


def run_in_v2_vm(script_text: str, timeout: float = 110) -> tuple[int, str]:
    """Runs a python script (text) in the guest with the repository importable.

    Returns (exit status, the script's stdout+stderr); a guest that never reports is
    exit status -1 with the console log as output.
    """
    share = tempfile.mkdtemp(prefix=tagged("zviz-cg2vm") + "-", dir="/var/tmp")
    try:
        script = os.path.join(share, "script.py")
        output = os.path.join(share, "output.txt")
        with open(script, "w") as f:
            f.write(script_text)
        guest_cmd = (
            f"cd {REPO} && PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 "
            f"{sys.executable} {script} > {output} 2>&1"
        )
        run = boot(guest_cmd, share, timeout=timeout)
        if run.guest_rc is None:
            return -1, run.console
        with open(output) as f:
            return run.guest_rc, f.read()
    finally:
        shutil.rmtree(share, ignore_errors=True)


if __name__ == "__main__":
    # python -m integration.cgroup2_vm SCRIPT.py: run a script in the guest by hand
    with open(sys.argv[1]) as source:
        rc, text = run_in_v2_vm(source.read())
    print(text, end="")
    sys.exit(rc)
