"""The syscall seam itself: the recording implementation stays the real one's twin, and
the real one's unprivileged calls answer as the kernel does."""

import inspect
import os

from runtime import linux
from runtime.syscall import LINUX, Syscall
from tests.recording_syscall import RecordingSyscall


def _methods(cls) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def _shape(signature: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_the_recorder_has_every_method_of_the_real_seam_with_the_same_parameters():
    real = _methods(Syscall)
    recording = _methods(RecordingSyscall)
    assert set(real) <= set(recording), set(real) - set(recording)
    for name, signature in real.items():
        assert _shape(recording[name]) == _shape(signature), name


def _status_mask(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise AssertionError(field)


def test_the_real_capget_reads_the_threads_sets():
    effective, permitted, inheritable = LINUX.capget()
    assert effective == _status_mask("CapEff")
    assert permitted == _status_mask("CapPrm")
    assert inheritable == _status_mask("CapInh")


def test_the_real_prctl_reads_the_bounding_set():
    bounding = _status_mask("CapBnd")
    for cap in (0, 8, 21):
        assert LINUX.prctl(linux.PR_CAPBSET_READ, cap) == (1 if bounding & (1 << cap) else 0)


def test_the_real_openat2_refuses_a_symlink_beneath(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "link")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        resolve = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS
        os.close(LINUX.openat2(fd, "dir", os.O_PATH, resolve))
        try:
            LINUX.openat2(fd, "link", os.O_PATH, resolve)
        except OSError as exc:
            assert exc.errno == 40 and "openat2(link)" in exc.strerror  # ELOOP
        else:
            raise AssertionError("openat2 followed a symlink under RESOLVE_NO_SYMLINKS")
    finally:
        os.close(fd)


def test_recorded_failures_read_like_the_real_wrappers():
    recorder = RecordingSyscall()
    recorder.fail("umount2", 22)
    try:
        recorder.umount2("/s5seam", linux.MNT_DETACH)
    except OSError as exc:
        assert (exc.errno, exc.strerror) == (22, "umount2(/s5seam): Invalid argument")
    else:
        raise AssertionError("no failure")
    assert [c.name for c in recorder.calls] == ["umount2"]
