"""A profile's pids and memory ceilings hold against linux.resources.unified (cgroup v2).

harden_spec lowers linux.resources.{pids,memory}.limit to the profile's ceiling, and
`update` refuses a limit above it; but the v2 plan writes linux.resources.unified after
those fields, so {"pids.max": "max"} in config.json (or in an Update) would have put the
ceiling back to unlimited. The first tests run the decisions the runtime takes at
create and at update (parse, harden, plan: the same functions, no kernel needed: the v2
plan is pure); the last runs a container through `zviz run` on the cgroup v2 guest
(integration/cgroup2_vm.py) and reads pids.max from inside it.
"""

import json

import pytest

from integration.cgroup2_vm import missing_requirements, run_in_v2_vm
from runtime.cgroups import v2
from runtime.errors import InvalidArgument
from runtime.security import check_resources, harden_spec, resolve_profile
from runtime.spec import parse_resources, parse_spec
from tools.mkbundle import default_config

ESCAPES = [
    ({"pids.max": "max"}, "pids.max"),
    ({"pids.max": "100000"}, "pids.max"),
    ({"memory.max": "max"}, "memory.max"),
    ({"memory.max": str(1 << 40)}, "memory.max"),
]


def _final(writes, file: str) -> str | None:
    """What the file holds once every planned write is done."""
    values = [w.value for w in writes if w.file == file]
    return values[-1] if values else None


@pytest.mark.parametrize(("unified", "file"), ESCAPES)
def test_create_never_plans_a_limit_above_the_profiles_ceiling(tmp_path, unified, file):
    profile = resolve_profile("hostile-tenant")
    ceiling = {"pids.max": profile.pids_max, "memory.max": profile.memory_max}[file]
    assert ceiling is not None
    config = default_config(["true"])
    config["linux"].setdefault("resources", {})["unified"] = dict(unified)
    (tmp_path / "rootfs").mkdir()
    spec = parse_spec(config, str(tmp_path))
    try:
        harden_spec(spec, profile)
    except InvalidArgument as refused:
        assert f'unified["{file}"]' in str(refused) and "ceiling" in str(refused)
        return
    final = _final(v2.plan(spec.linux.resources), file)
    assert final is not None and final.isdigit() and int(final) <= ceiling, (
        f"{file} = {final}: above profile hostile-tenant's ceiling {ceiling}"
    )


@pytest.mark.parametrize(("unified", "file"), ESCAPES)
def test_update_is_refused_above_the_profiles_ceiling(unified, file):
    profile = resolve_profile("hostile-tenant")
    with pytest.raises(InvalidArgument, match=rf'unified\["{file}"\].*ceiling'):
        check_resources(profile, parse_resources({"unified": dict(unified)}))


def test_unified_limits_within_the_ceiling_still_apply():
    profile = resolve_profile("hostile-tenant")
    within = {"pids.max": "16", "memory.max": str(profile.memory_max // 2), "memory.high": "max"}
    check_resources(profile, parse_resources({"unified": within}))
    planned = {w.file: w.value for w in v2.plan(parse_resources({"unified": within}))}
    assert planned["pids.max"] == "16" and planned["memory.high"] == "max"


# Runs in the guest (a plain script: pytest is slow to start there).
GUEST_RUN = """
import json, os, subprocess, sys
from runtime.defaults import default_config
from tools.mkbundle import build_bundle

args = ["cat", "/sys/fs/cgroup/pids.max"]
config = default_config(args=args, terminal=False)
config["linux"]["resources"]["unified"] = {"pids.max": "max"}
bundle = build_bundle("/tmp/zviz-vm-ceiling", args=args, linux=config["linux"])
zviz = os.path.join(os.path.dirname(sys.executable), "zviz")
done = subprocess.run(
    [zviz, "--root", "/run/zviz", "run", "--bundle", bundle, "zviz-vm-ceiling"],
    capture_output=True, text=True, timeout=120,
)
print("RESULT " + json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr}))
"""


def test_on_a_cgroup_v2_kernel_unified_cannot_lift_the_pids_ceiling():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no cgroup v2 guest: {reason}")
    rc, output = run_in_v2_vm(GUEST_RUN, timeout=110)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert rc == 0 and lines, f"guest script failed (rc {rc}):\n{output[-4000:]}"
    ran = json.loads(lines[-1][len("RESULT ") :])
    # ci-runner, the default profile, caps pids at 1024: "max" inside is the escape
    assert ran["out"].strip() != "max", "pids.max inside the container is unlimited"
    assert ran["rc"] != 0 and 'unified["pids.max"]' in ran["err"], ran
