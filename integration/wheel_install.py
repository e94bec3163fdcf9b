"""zviz as a user installs it: the wheel (built from the sdist) in a fresh venv outside the checkout.

One install per test session, made on first use and removed when the session ends. The
dependencies come from the package index through pip (and pip's cache); the checkout is
never on the install's import path: commands run with a clean environment from a
directory outside it.
"""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

from integration.ids import tagged
from tools import dist


@functools.cache
def built() -> tuple[str, str]:
    """(sdist, wheel) of this checkout, cached per source hash (tools/dist.py)."""
    return dist.build()


class Install:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.venv = os.path.join(prefix, "zviz")
        self.bin = os.path.join(self.venv, "bin")

    def env(self, **extra) -> dict:
        """PATH with this install first, nothing pointing back at the checkout."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        }
        env["PATH"] = f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env.update(extra)
        return env

    def run(self, program: str, *args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [os.path.join(self.bin, program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.prefix,
            env=self.env(**env),
        )


@functools.cache
def installed() -> Install:
    _sdist, wheel = built()
    # /var/tmp, like /opt: a path that has nothing to do with the checkout.
    prefix = tempfile.mkdtemp(prefix=tagged("zviz-wheel-opt") + "-", dir="/var/tmp")
    atexit.register(shutil.rmtree, prefix, True)
    install = Install(prefix)
    # The system's interpreter, not the checkout venv's (whose path pyvenv.cfg would record).
    python = os.path.realpath(sys.executable)
    subprocess.run([python, "-m", "venv", install.venv], check=True, timeout=120)
    subprocess.run(
        [os.path.join(install.bin, "python"), "-m", "pip", "install", "-q", wheel],
        check=True,
        timeout=600,
        cwd=prefix,
        env=install.env(),
    )
    return install
