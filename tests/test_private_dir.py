"""makedirs_private: every level it makes is 0700 (os.makedirs made the parents 0755)."""

import os
import re
import stat

import pytest

from runtime.private_dir import makedirs_private


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_level_it_makes_is_private(tmp_path):
    old = os.umask(0o022)
    try:
        makedirs_private(str(tmp_path / "a" / "b" / "c"))
    finally:
        os.umask(old)
    for level in ("a", "a/b", "a/b/c"):
        assert _mode(tmp_path / level) == 0o700, level


def test_existing_directories_keep_their_mode(tmp_path):
    (tmp_path / "shared").mkdir(mode=0o755)
    os.chmod(tmp_path / "shared", 0o755)
    makedirs_private(str(tmp_path / "shared" / "mine"))
    assert _mode(tmp_path / "shared") == 0o755
    assert _mode(tmp_path / "shared" / "mine") == 0o700
    makedirs_private(str(tmp_path / "shared" / "mine"))  # again: nothing to do, no error


def test_a_file_in_the_way_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        makedirs_private(str(tmp_path / "file" / "sub"))


def test_no_caller_makes_private_directories_with_os_makedirs():
    """One decision in one place: a `mode=0o700` makedirs leaves its parents 0755."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    call = re.compile(r"os\.makedirs\([^)]*mode=0o700")
    offenders = []
    for package in ("runtime", "shim"):
        for directory, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                path = os.path.join(directory, name)
                if name.endswith(".py") and name != "private_dir.py":
                    with open(path) as f:
                        if call.search(f.read()):
                            offenders.append(os.path.relpath(path, root))
    assert not offenders
