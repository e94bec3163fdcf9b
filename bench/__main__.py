"""`make bench`: every benchmark, zviz beside runc and gVisor, reported as ratios.

Each module under bench/ has a main() that prints its own table. A benchmark that
cannot run prints why and the others still run.
"""

import importlib
import sys
import time
import traceback

MODULES = [
    "bench.cli_run",
    "bench.syscalls",
    "bench.denials",
    "bench.connect",
    "bench.ttrpc",
    "bench.shim",
    "bench.pods",
    "bench.workloads",
]


def main() -> int:
    failed = []
    only = sys.argv[1:]
    for name in MODULES:
        if only and name.split(".")[-1] not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(name).main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name} took {time.monotonic() - started:.1f}s)", flush=True)
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
