"""`tests/` as uid 65534: the fast tests run as any user (issue 9), and keep doing so.

A fast test that needs root must be marked with tests/privileges.py (`needs_root`) and
skip naming the operation; an unmarked one fails only here, as nobody, since `make test`
runs `tests/` as root. The checkout's venv cannot serve: its interpreter may live under a
0700 /root (pyenv), so uid 65534 gets a venv of Debian's /usr/bin/python3 with the
project's dependencies (pyproject.toml), built once per dependency list and cached under
/var/cache/zviz-tools as tools/gotools.py caches the Go tools. Each run installs this
checkout's copy into a thin venv of its own on top of it (the fast tests start
`zviz`, the shim's script and `python -m shim.main`, as `make install` provides them).

It adds 30-65 s to `make test` here (the fast tests once more, on 2 loaded cores), plus
the venv's one-time build (about a minute, with the package index reachable).
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib

import pytest

from integration.ids import TAG_VARIABLE, session_tag, tagged
from tools.gotools import CACHE_ROOT

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the copy of the checkout leaves out: the checkout's own venv and build products.
NOT_COPIED = (".git", ".venv", "_build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def requirements() -> list[str]:
    """What the fast tests import and what builds the project: named in pyproject.toml only."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    return sorted(
        project["build-system"]["requires"]
        + project["project"]["dependencies"]
        + project["project"]["optional-dependencies"]["test"]
    )


def _site_packages(venv: str) -> str:
    """As the venv's own interpreter names it (the running one may be another Python)."""
    asked = [f"{venv}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    return subprocess.run(asked, capture_output=True, text=True, check=True).stdout.strip()


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def dependencies_venv() -> str:
    """The cached venv with `requirements()`, built if missing; skips when it cannot be."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to build a venv that uid {NOBODY} can execute")
    wanted = {"python": os.path.realpath(SYSTEM_PYTHON), "requirements": requirements()}
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    venv = os.path.join(CACHE_ROOT, f"fast-tests-venv-{key}")
    complete = os.path.join(venv, ".complete")
    os.makedirs(CACHE_ROOT, exist_ok=True)
    # Sessions beside this one may want the same venv: one builds, the others wait.
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(complete):
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a build that was cut short
        made = _run([SYSTEM_PYTHON, "-m", "venv", venv], timeout=300)
        if made.returncode != 0:
            pytest.skip(f"cannot make a venv with {SYSTEM_PYTHON} -m venv: {made.stderr[-500:]}")
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
        installed = _run([*pip, *wanted["requirements"]], timeout=900)
        if installed.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"cannot install the fast tests' dependencies: {installed.stderr[-800:]}")
        # Readable and executable by nobody whatever this process's umask was.
        subprocess.run(["chmod", "-R", "a+rX", venv], check=True)
        with open(complete, "w") as f:
            json.dump(wanted, f)
    return venv


@pytest.fixture
def workdir():
    """A directory uid 65534 can traverse: the checkout's copy, the thin venv, its home."""
    # /tmp, not $TMPDIR: root's may sit below a directory nobody cannot traverse.
    path = tempfile.mkdtemp(prefix=tagged("zviz-nobody") + "-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The whole of tests/ once more, on a machine other sessions load: far above the default.
@pytest.mark.timeout(1800)
def test_fast_tests_pass_as_nobody(workdir):
    base = dependencies_venv()
    # A copy: the checkout's path may not be traversable by nobody (a 0700 home).
    tree = os.path.join(workdir, "tree")
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    venv = os.path.join(workdir, "venv")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    # The thin venv sees the cached one's packages through a .pth line, and gets the
    # project itself (with its console scripts) from the copy, without the index.
    with open(os.path.join(_site_packages(venv), "zviz-fast-tests-deps.pth"), "w") as f:
        f.write(_site_packages(base) + "\n")
    pip = [os.path.join(base, "bin", "python"), "-m", "pip", "--python", f"{venv}/bin/python"]
    no_index = ["install", "-q", "--no-deps", "--no-build-isolation", "--no-index", tree]
    installed = _run([*pip, *no_index], timeout=300)
    assert installed.returncode == 0, installed.stderr
    subprocess.run(["chmod", "-R", "a+rX", workdir], check=True)
    home = os.path.join(workdir, "home")
    os.mkdir(home, 0o700)
    os.chown(home, NOBODY, NOBODY)

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": home,
        "TMPDIR": home,  # every mkdtemp of the run lands here
        "LANG": "C.UTF-8",
        TAG_VARIABLE: session_tag(),  # what the run leaves behind is this session's
    }
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    pytest_argv = [
        f"{venv}/bin/python",
        *("-m", "pytest", "-q", "tests", "-p", "no:cacheprovider"),
        # A short tmp_path: the fast tests bind unix sockets there (at most 107 bytes).
        f"--basetemp={home}/t",
        "-rfE",  # failures and errors summed up at the end, not the expected skips
    ]
    result = _run([*setpriv, *pytest_argv], cwd=tree, env=env, timeout=1200)
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0, output[-12000:]
    assert re.search(r"\d+ passed", summary), summary
    assert not re.search(r"\d+ (failed|errors?)\b", summary), output[-12000:]
