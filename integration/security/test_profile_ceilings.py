"""A profile's pids and memory ceilings hold against linux.resources.unified (cgroup v2).

harden_spec lowers linux.resources.{pids,memory}.limit to the profile's ceiling, and
`update` refuses a limit above it; but the v2 plan writes linux.resources.unified after
those fields, so {"pids.max": "max"} in config.json (or in an Update) would have put the
ceiling back to unlimited. These run the decisions the runtime takes at create and at
update (parse, harden, plan: the same functions, no kernel needed: the v2 plan is pure);
the cgroup v2 guest (integration/test_cgroups_v2_vm.py) is where a plan meets the kernel.
"""

import pytest

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
