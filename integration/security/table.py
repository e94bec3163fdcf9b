"""Print the escape table for docs/security.md: each probe under zviz (two profiles) and runc.

python -m integration.security.table [--json FILE]
"""

import argparse
import json
import shutil
import sys
import tempfile

from integration.ids import tagged
from integration.security.conftest import ProbeRunner, build_probe, host_listener_socket
from integration.security.escapes import PROBES, probe_arg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    import os

    server = host_listener_socket()
    listener = f"127.0.0.1:{server.sock.getsockname()[1]}"
    base = tempfile.mkdtemp(prefix=tagged("zviz-sec-table") + "-")
    venv = os.path.dirname(sys.executable)
    zviz = os.environ.get("ZVIZ_BIN", os.path.join(venv, "zviz"))
    os.chmod(base, 0o755)  # the mapped container root must reach the bundles
    runner = ProbeRunner(base, build_probe(), zviz, shutil.which("runc"))
    columns = [("zviz", "ci-runner"), ("zviz", "hostile-tenant"), ("runc", None)]
    rows = {}
    try:
        for name in PROBES:
            rows[name] = {}
            for runtime, profile in columns:
                verdict = runner.verdict(runtime, profile, name, probe_arg(name, profile, listener))
                rows[name][f"{runtime}:{profile or 'default'}"] = list(verdict)
                print(f"{name:18} {runtime}:{profile or '-':15} {verdict}", file=sys.stderr)
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    print(
        "| probe | technique | zviz ci-runner | zviz hostile-tenant | runc (no seccomp profile) |"
    )
    print("|---|---|---|---|---|")
    for name, probe in PROBES.items():
        cells = []
        for key in ("zviz:ci-runner", "zviz:hostile-tenant", "runc:default"):
            word, outcome, _ = rows[name][key]
            cell = f"{word} ({outcome})" if word != "ESCAPED" else "**ESCAPED**"
            pinned = PROBES[name].expected(key.partition(":")[2].replace("default", ""))
            if outcome != pinned:  # the tests would fail (or skip) here: say so in the table
                cell += f", pinned {pinned}"
            cells.append(cell)
        print(f"| {name} | {probe.technique} | " + " | ".join(cells) + " |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
