"""`zviz profile diff A B` as an operator runs it: the installed binary, a built-in and a
profile file of the operator's that extends it."""

import json
import os
import subprocess
import tempfile

from integration.ids import tagged


def test_diff_of_a_built_in_and_a_file_that_extends_it(zviz_bin):
    directory = tempfile.mkdtemp(prefix=tagged("zviz-profile-diff") + "-")
    path = os.path.join(directory, "stricter.toml")
    try:
        with open(path, "w") as f:
            f.write(
                '[profile]\nname = "stricter"\nextends = "ci-runner"\nmode = "audit"\n'
                '[seccomp]\nallow_remove = ["kill", "tgkill"]\n'
            )
        done = subprocess.run(
            [zviz_bin, "profile", "diff", "ci-runner", path, "--format", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["a_only"] == {"seccomp allow": ["kill", "tgkill"]}
        assert result["b_only"] == {}
        assert result["settings"] == {"mode": ["enforce", "audit"]}
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
