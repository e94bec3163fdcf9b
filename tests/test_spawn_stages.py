"""The stages of a spawn (runtime/spawn/) are loaded by the fork server before it forks:
a `zviz run` served by it imports none of them on its way (a child past setns(mnt) or
pivot_root could not import them at all)."""

import pathlib
import subprocess
import sys

import runtime.spawn

STAGES = sorted(
    f"runtime.spawn.{path.stem}"
    for path in pathlib.Path(runtime.spawn.__file__).parent.glob("*.py")
    if path.stem != "__init__"
)


def test_the_fork_servers_preload_brings_every_stage():
    # A fresh interpreter: this one has imported whatever other tests needed.
    script = (
        "import importlib, sys\n"
        "from runtime import cli, commands, forkserver\n"
        "for name in forkserver.PRELOADED:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"  # as serve() does
        "        pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('runtime.spawn.'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        cwd=pathlib.Path(runtime.spawn.__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert STAGES and set(STAGES) <= set(loaded), set(STAGES) - set(loaded)
