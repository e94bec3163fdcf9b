"""`zviz`: the entry point of the runc-compatible command line.

Deliberately tiny: a plain `zviz run` or `exec` first tries the fork server
(runtime/forkserver.py), which has the runtime already imported; only when that
can't serve does this process import the commands (runtime/commands.py) and do the
work itself. Nothing heavier than os and sys is imported before that decision.
"""

import os
import sys


def main(argv=None, on_pid=None) -> int:
    is_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if on_pid is None and ("run" in argv or "exec" in argv):
        from runtime import forkserver

        code = forkserver.try_run(argv)
        if code is not None:
            if is_program:
                # Served: this process holds nothing to clean up, and the interpreter's
                # teardown would add ~1 ms to every `zviz run`.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            return code
    from runtime.commands import run_cli

    return run_cli(argv, on_pid)


if __name__ == "__main__":
    sys.exit(main())
