"""Build zviz's sdist and, from that sdist, its wheel: `make dist` and the wheel tests.

A PEP 517 front end in a few lines (the `build` package is not one of our dependencies):
the build backend named by pyproject.toml's build-system.requires runs in a venv of its
own, cached per requirement set; the sdist comes from the checkout, the wheel from the
sdist, so the wheel that ships is the one anyone rebuilding the sdist gets. Outputs are
cached per source hash (the files a build reads), so a test session rebuilds only what
changed.

    python -m tools.dist OUT_DIR        # prints the sdist's and the wheel's paths
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = "/var/tmp/zviz-dist-cache"
# What a build reads: the packages (with their data) and the project's metadata.
SOURCE_DIRS = ("runtime", "shim", "api")
SOURCE_FILES = ("pyproject.toml", "README.md")
DIRECT = "from-source-tree"


def source_hash(checkout: str = CHECKOUT) -> str:
    digest = hashlib.sha256()
    # This file decides what a cached build holds: a change to it is a change of source.
    with open(os.path.abspath(__file__), "rb") as f:
        digest.update(f.read())
    paths = [os.path.join(checkout, name) for name in SOURCE_FILES]
    for top in SOURCE_DIRS:
        for dirpath, dirnames, files in os.walk(os.path.join(checkout, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            paths += [os.path.join(dirpath, f) for f in sorted(files) if not f.endswith(".pyc")]
    for path in paths:
        digest.update(os.path.relpath(path, checkout).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def build_requires(checkout: str = CHECKOUT) -> list[str]:
    with open(os.path.join(checkout, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["build-system"]["requires"]


def build_env(cache: str = CACHE_DIR, checkout: str = CHECKOUT) -> str:
    """The python of a venv holding the build backend (created once per requirement set)."""
    requires = build_requires(checkout)
    key = hashlib.sha256("\n".join(requires).encode()).hexdigest()[:12]
    env = os.path.join(cache, f"build-env-{key}")
    python = os.path.join(env, "bin", "python")
    if os.path.exists(os.path.join(env, ".ready")):
        return python
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="build-env-", dir=cache)
    subprocess.run([sys.executable, "-m", "venv", staging], check=True)
    subprocess.run(
        [os.path.join(staging, "bin", "python"), "-m", "pip", "install", "-q", *requires],
        check=True,
    )
    open(os.path.join(staging, ".ready"), "w").close()
    try:
        os.rename(staging, env)
    except OSError:  # built meanwhile by another run: use that one
        shutil.rmtree(staging, ignore_errors=True)
    # Moved, a venv still works through `bin/python -m ...` (pyvenv.cfg is found beside
    # bin/), which is all this env is used for; its scripts' #! lines are never run.
    return python


def direct_wheel(checkout: str = CHECKOUT, cache: str = CACHE_DIR) -> str:
    """The wheel built straight from the source tree, beside the sdist's (for comparison)."""
    build(checkout=checkout, cache=cache)
    directory = os.path.join(cache, source_hash(checkout), DIRECT)
    (name,) = os.listdir(directory)
    return os.path.join(directory, name)


def build(out_dir: str | None = None, checkout: str = CHECKOUT, cache: str = CACHE_DIR):
    """(sdist, wheel) for the checkout as it is: cached per source hash, copied to OUT_DIR."""
    built = os.path.join(cache, source_hash(checkout))
    if not os.path.exists(os.path.join(built, ".ready")):
        python = build_env(cache, checkout)
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="dist-", dir=cache)
        # The sdist, from a copy: setuptools writes egg-info and build/ where it runs,
        # and the checkout is no place for a build's leftovers.
        tree = os.path.join(staging, "tree")
        shutil.copytree(
            checkout,
            tree,
            ignore=lambda d, names: [
                n for n in names if n in (".venv", ".git", "build", "_build") or "egg-info" in n
            ],
        )
        subprocess.run(
            [
                python,
                "-c",
                "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])",
                staging,
            ],
            cwd=tree,
            check=True,
            capture_output=True,
        )
        # Also the wheel straight from the source tree: the tests compare it with the one
        # the sdist gives (a file the sdist forgets would be missing from the second only).
        subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
            + ["-w", os.path.join(staging, DIRECT), tree],
            check=True,
            capture_output=True,
            cwd=staging,
        )
        shutil.rmtree(tree)
        (sdist,) = [n for n in os.listdir(staging) if n.endswith(".tar.gz")]
        # The wheel from the sdist, with the same backend (no network: it is all here).
        subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
            + ["-w", staging, os.path.join(staging, sdist)],
            check=True,
            capture_output=True,
            cwd=staging,
        )
        open(os.path.join(staging, ".ready"), "w").close()
        try:
            os.rename(staging, built)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    names = sorted(os.listdir(built))
    sdist = os.path.join(built, next(n for n in names if n.endswith(".tar.gz")))
    wheel = os.path.join(built, next(n for n in names if n.endswith(".whl")))
    if out_dir is None:
        return sdist, wheel
    os.makedirs(out_dir, exist_ok=True)
    return tuple(shutil.copy2(path, out_dir) for path in (sdist, wheel))


if __name__ == "__main__":
    for path in build(sys.argv[1] if len(sys.argv) > 1 else "dist"):
        print(path)
