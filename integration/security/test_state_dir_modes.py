"""The state root's parents are 0700 at every level zviz makes (runtime/private_dir.py).

os.makedirs(root, mode=0o700) made only the last level 0700 and its parents 0755: any
user could list them (on a node, /run/zviz and /run/zviz-shim/g, /r: the names of the
containers' state directories and of the shim groups). runc's MkdirAll makes every
level 0700. This failed before the fix (the parents were 0755).
"""

import os
import stat
import subprocess

from integration.ids import unique_id


def test_every_level_of_a_new_state_root_is_private(zviz_bin, make_bundle, tmp_path):
    root = tmp_path / "fresh" / "state" / "root"
    result = subprocess.run(
        [zviz_bin, "--root", str(root), "run", "--bundle", make_bundle(), unique_id()],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for level in (tmp_path / "fresh", tmp_path / "fresh" / "state", root):
        assert stat.S_IMODE(os.stat(level).st_mode) == 0o700, level
