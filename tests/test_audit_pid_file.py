"""--pid-file is written by root, often into a shared directory: no symlink games.

A local user who can write to the pid file's directory (e.g. /tmp) must not make
zviz truncate or overwrite another file by planting a symlink where zviz writes.
"""

import os

import pytest

from runtime.container import write_pid_file


@pytest.fixture
def shared_dir(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return shared, victim


def test_planted_symlink_at_the_temporary_name_is_not_followed(shared_dir):
    shared, victim = shared_dir
    # The old fixed temporary name: a symlink planted there was opened O_TRUNC.
    os.symlink(victim, shared / ".init.pid.zviz-tmp")
    write_pid_file(str(shared / "init.pid"), 4242)
    assert victim.read_text() == "precious\n"
    assert (shared / "init.pid").read_text() == "4242"
    assert not (shared / "init.pid").is_symlink()


def test_pid_file_replaces_a_symlink_instead_of_writing_through_it(shared_dir):
    shared, victim = shared_dir
    os.symlink(victim, shared / "init.pid")
    write_pid_file(str(shared / "init.pid"), 77)
    assert victim.read_text() == "precious\n"
    assert (shared / "init.pid").read_text() == "77"


def test_no_temporary_file_is_left_behind(shared_dir):
    shared, _victim = shared_dir
    write_pid_file(str(shared / "init.pid"), 5)
    assert sorted(os.listdir(shared)) == ["init.pid"]


def test_an_unwritable_place_is_a_clear_error_naming_the_file(tmp_path):
    from runtime import errors

    target = tmp_path / "missing" / "init.pid"
    with pytest.raises(errors.InvalidArgument, match=f"--pid-file {target}: No such file"):
        write_pid_file(str(target), 9)
