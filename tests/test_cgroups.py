"""Path resolution and OCI resources -> cgroup file writes, without touching the kernel."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import cgroups
from runtime.cgroups import devices, v1, v2
from runtime.cgroups.common import Write
from runtime.cgroups.devices import DEFAULT_ALLOWED
from runtime.errors import FailedPrecondition, InvalidArgument
from runtime.spec import parse_resources


def v1_plan(resources, **host):
    """v1.plan of a linux.resources dict, validated as the runtime validates it first."""
    return v1.plan(parse_resources(resources, "config.json"), **host)


def v2_plan(resources, **host):
    return v2.plan(parse_resources(resources, "config.json"), **host)


def typed_rules(rules: list[dict]) -> list[devices.DeviceRule]:
    return parse_resources({"devices": rules}, "config.json").devices


# This machine's hybrid layout: v1 controllers, plus a cgroup2 mount holding only hugetlb.
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw
"""

PURE_V2_MOUNTINFO = """\
25 1 0:22 / / rw - 9p host0 ro
30 25 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

OWN_CGROUPS = """\
9:name=systemd:/
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/
"""


def test_parse_mountinfo_finds_v1_hierarchies_and_their_controllers():
    mounts = cgroups.parse_mountinfo(HYBRID_MOUNTINFO)
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by_point["/sys/fs/cgroup/cpuset"].controllers == {"cpuset"}  # clone_children dropped
    assert by_point["/sys/fs/cgroup/unified"].version == 2
    assert "/sys/fs/cgroup" not in by_point  # the tmpfs is not a cgroup mount
    assert "/proc" not in by_point


def test_parse_mountinfo_unescapes_mount_points():
    text = "40 31 0:37 / /mnt/my\\040cg rw - cgroup cgroup rw,pids\n"
    assert cgroups.parse_mountinfo(text)[0].mount_point == "/mnt/my cg"


def test_hybrid_host_is_v1_and_pure_v2_is_v2():
    assert cgroups.detect_version(cgroups.parse_mountinfo(HYBRID_MOUNTINFO)) == 1
    assert cgroups.detect_version(cgroups.parse_mountinfo(PURE_V2_MOUNTINFO)) == 2


def test_no_cgroup_mount_is_a_failed_precondition():
    with pytest.raises(FailedPrecondition, match="no cgroup filesystem"):
        cgroups.detect_version(cgroups.parse_mountinfo("50 23 0:40 / /proc rw - proc proc rw\n"))


def test_parse_proc_cgroup_splits_co_mounted_controllers():
    own = cgroups.parse_proc_cgroup(OWN_CGROUPS)
    assert own["cpu"] == own["cpuacct"] == "/"
    assert own["memory"] == "/process_api/abc"
    assert own["unified"] == "/"


@pytest.mark.parametrize(
    ("given_path", "expected"),
    [
        (None, ("/zviz/c1", False)),
        ("", ("/zviz/c1", False)),
        ("/k8s.io/abc", ("/k8s.io/abc", False)),
        ("/a//b/./c/", ("/a/b/c", False)),
        ("mine/c1", ("/mine/c1", True)),
    ],
)
def test_container_path(given_path, expected):
    assert cgroups.container_path(given_path, "c1") == expected


@pytest.mark.parametrize(
    ("given_path", "expected"),
    [
        # containerd's CRI with the kubelet's systemd cgroup driver
        (
            "kubepods-besteffort-pod12ab.slice:cri-containerd:c1",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12ab.slice"
            "/cri-containerd-c1.scope",
        ),
        ("system.slice:docker:c1", "/system.slice/docker-c1.scope"),
        (":zviz:c1", "/system.slice/zviz-c1.scope"),
        ("-.slice::c1", "/c1.scope"),
        ("user.slice:zviz:sub.slice", "/user.slice/sub.slice"),
    ],
)
def test_systemd_style_paths_expand_as_systemd_lays_them_out(given_path, expected):
    assert cgroups.container_path(given_path, "c1") == (expected, False)


@pytest.mark.parametrize(
    ("given_path", "message"),
    [
        ("system.slice:zviz:", "not a slice:prefix:name"),
        ("-a.slice:zviz:c1", "is not a systemd slice"),
        ("a--b.slice:zviz:c1", "is not a systemd slice"),
        ("kubepods:zviz:c1", "is not a systemd slice"),
        ("/a/../../etc", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("/", "must name a cgroup below the root"),
        (".", "must name a cgroup below the root"),
        ("/a\nb", "NUL or newline"),
    ],
)
def test_container_path_refuses(given_path, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        cgroups.container_path(given_path, "c1")
    assert "linux.cgroupsPath" in str(info.value)
    # config.json is refused by the same function, in the same words, before anything exists
    from runtime.defaults import default_config
    from runtime.spec import parse_spec

    config = default_config()
    config["root"]["path"] = "/"
    config["linux"]["cgroupsPath"] = given_path
    with pytest.raises(InvalidArgument) as parsed:
        parse_spec(config, "/")
    assert str(parsed.value) == str(info.value)


def test_v1_absolute_path_is_below_every_hierarchy_root():
    cg = cgroups.cgroup_at("/zviz/c1", False, cgroups.parse_mountinfo(HYBRID_MOUNTINFO), {})
    assert cg.version == 1
    assert cg.paths["memory"] == "/sys/fs/cgroup/memory/zviz/c1"
    assert cg.paths["cpu"] == cg.paths["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct/zviz/c1"
    # name=systemd and the hugetlb-only cgroup2 mount are not container controllers
    assert set(cg.paths) == {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids"}


def test_v1_relative_path_is_below_the_callers_cgroup_in_each_hierarchy():
    own = cgroups.parse_proc_cgroup(OWN_CGROUPS)
    cg = cgroups.cgroup_at("/sub/c1", True, cgroups.parse_mountinfo(HYBRID_MOUNTINFO), own)
    assert cg.paths["memory"] == "/sys/fs/cgroup/memory/process_api/abc/sub/c1"
    assert cg.paths["pids"] == "/sys/fs/cgroup/pids/sub/c1"


def test_relative_path_inside_a_cgroup_namespace_mount():
    # A mount whose root is the caller's own group (as inside a container).
    text = "35 31 0:32 /process_api/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    own = {"memory": "/process_api/abc"}
    cg = cgroups.cgroup_at("/c1", True, cgroups.parse_mountinfo(text), own)
    assert cg.paths["memory"] == "/sys/fs/cgroup/memory/c1"


def test_v2_paths():
    mounts = cgroups.parse_mountinfo(PURE_V2_MOUNTINFO)
    cg = cgroups.cgroup_at("/zviz/c1", False, mounts, {})
    assert cg.version == 2
    assert cg.paths == {"unified": "/sys/fs/cgroup/zviz/c1"}
    cg = cgroups.cgroup_at("/c1", True, mounts, {"unified": "/user.slice/me"})
    assert cg.paths == {"unified": "/sys/fs/cgroup/user.slice/me/c1"}


def test_load_picks_the_version_from_the_persisted_paths():
    assert cgroups.load({"unified": "/sys/fs/cgroup/zviz/c1"}).version == 2
    loaded = cgroups.load({"memory": "/sys/fs/cgroup/memory/zviz/c1"})
    assert loaded.version == 1 and loaded.paths == {"memory": "/sys/fs/cgroup/memory/zviz/c1"}
    with pytest.raises(InvalidArgument, match="absolute"):
        cgroups.load({"memory": "relative/dir"})


# --- v1 translation -------------------------------------------------------------------------

MiB = 1024 * 1024


def files(writes: list[Write]) -> list[tuple[str, str]]:
    return [(w.file, w.value) for w in writes]


def test_v1_memory_limit_and_swap_lowering_writes_the_limit_first():
    writes = v1_plan({"memory": {"limit": 64 * MiB, "swap": 128 * MiB}}, current_memory_limit=2**62)
    assert files(writes) == [
        ("memory.limit_in_bytes", str(64 * MiB)),
        ("memory.memsw.limit_in_bytes", str(128 * MiB)),
    ]


def test_v1_memory_limit_and_swap_raising_writes_memsw_first():
    writes = v1_plan({"memory": {"limit": 64 * MiB, "swap": 128 * MiB}}, current_memory_limit=MiB)
    assert [w.file for w in writes] == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]


def test_v1_unlimited_memory_means_unlimited_swap_when_memsw_exists():
    assert files(v1_plan({"memory": {"limit": -1}})) == [
        ("memory.memsw.limit_in_bytes", "-1"),
        ("memory.limit_in_bytes", "-1"),
    ]
    assert files(v1_plan({"memory": {"limit": -1}}, memsw_available=False)) == [
        ("memory.limit_in_bytes", "-1")
    ]


def test_v1_swap_below_limit_is_refused_before_the_kernel_sees_it():
    with pytest.raises(InvalidArgument, match=r"memory\.swap: must be at least memory.limit"):
        v1_plan({"memory": {"limit": 64 * MiB, "swap": 32 * MiB}})


def test_v1_swap_without_swap_accounting_is_refused():
    with pytest.raises(InvalidArgument, match="no swap accounting"):
        v1_plan({"memory": {"limit": 64 * MiB, "swap": 128 * MiB}}, memsw_available=False)


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"memory": {"limit": -5}}, "memory.limit"),
        ({"memory": {"reservation": -2}}, "memory.reservation"),
        ({"memory": {"swappiness": 101}}, "memory.swappiness"),
        # -1 (runc's "kernel default") is refused as config.json refuses it: one rule
        ({"memory": {"swappiness": -1}}, "memory.swappiness"),
        ({"memory": {"limit": True}}, "memory.limit"),
        ({"devices": [{"allow": True, "type": "x"}]}, "devices[0].type"),
        ({"devices": [{"allow": True, "type": "c", "major": -3}]}, "devices[0].major"),
        ({"devices": [{"allow": True, "access": "rwx"}]}, "devices[0].access"),
        ({"devices": [{"type": "c"}]}, "devices[0].allow"),
        ({"unified": {"memory.high": "1"}}, "unified"),
    ],
)
def test_v1_impossible_values_name_the_field(resources, field):
    with pytest.raises(InvalidArgument) as info:
        v1_plan(resources)
    assert f"linux.resources.{field}" in str(info.value)


def test_v1_other_memory_settings():
    writes = v1_plan(
        {"memory": {"reservation": 16 * MiB, "swappiness": 0, "disableOOMKiller": True}}
    )
    assert files(writes) == [
        ("memory.soft_limit_in_bytes", str(16 * MiB)),
        ("memory.swappiness", "0"),
        ("memory.oom_control", "1"),
    ]


def test_v1_pids_cpu_cpuset():
    writes = v1_plan(
        {
            "pids": {"limit": 32},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
        }
    )
    assert files(writes) == [
        ("pids.max", "32"),
        ("cpu.shares", "512"),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"),
        ("cpuset.cpus", "0"),
        ("cpuset.mems", "0"),
    ]
    assert files(v1_plan({"pids": {"limit": -1}})) == [("pids.max", "max")]
    assert v1_plan({"pids": {"limit": 0}}) == []


def test_v1_devices_start_from_deny_all_and_end_with_the_basic_nodes():
    writes = v1_plan(
        {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rw"},
                {"allow": False, "type": "b", "major": 8},
            ]
        }
    )
    assert files(writes)[:4] == [
        ("devices.deny", "a"),
        ("devices.deny", "a"),
        ("devices.allow", "c 10:200 rw"),
        ("devices.deny", "b 8:* rwm"),
    ]
    assert files(writes)[4:] == [("devices.allow", rule.v1_line()) for rule in DEFAULT_ALLOWED]
    assert ("devices.allow", "c 136:* rwm") in files(writes)
    assert writes[2].field == "devices[1]"


def test_v1_controller_missing_from_host():
    with pytest.raises(InvalidArgument, match="pids cgroup controller is not mounted"):
        v1_plan({"pids": {"limit": 5}}, available=frozenset({"memory"}))
    # per-host optional features are skipped, not fatal
    assert (
        v1_plan({"hugepageLimits": [{"pageSize": "2MB", "limit": 0}]}, available=frozenset()) == []
    )


def test_v1_blkio_and_hugetlb():
    writes = v1_plan(
        {
            "blockIO": {
                "weight": 500,
                "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}],
            },
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}],
        }
    )
    assert files(writes) == [
        ("blkio.weight", "500"),
        ("blkio.throttle.read_bps_device", "8:0 1000"),
        ("hugetlb.2MB.limit_in_bytes", str(4 * MiB)),
    ]


def test_empty_resources_write_nothing():
    assert v1_plan({}) == [] and v1_plan(None) == []
    assert v2_plan({}) == [] and v2_plan(None) == []


# --- v2 translation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "weight"), [(2, 1), (1024, 39), (262144, 10000), (0, 0), (512, 20)]
)
def test_shares_to_weight_matches_runc(shares, weight):
    assert v2.shares_to_weight(shares) == weight


@given(st.integers(min_value=2, max_value=262143))
def test_shares_to_weight_is_monotonic_and_in_range(shares):
    low, high = v2.shares_to_weight(shares), v2.shares_to_weight(shares + 1)
    assert 1 <= low <= high <= 10000


def test_v2_memory():
    writes = v2_plan({"memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": MiB}})
    assert files(writes) == [
        ("memory.max", str(64 * MiB)),
        ("memory.swap.max", str(32 * MiB)),  # memory+swap minus memory
        ("memory.low", str(MiB)),
    ]
    assert files(v2_plan({"memory": {"limit": -1}})) == [
        ("memory.max", "max"),
        ("memory.swap.max", "max"),
    ]
    assert files(v2_plan({"memory": {"limit": 64 * MiB, "swap": -1}})) == [
        ("memory.max", str(64 * MiB)),
        ("memory.swap.max", "max"),
    ]


def test_v2_swap_needs_a_memory_limit():
    with pytest.raises(InvalidArgument, match="swap limit needs the memory limit"):
        v2_plan({"memory": {"swap": 96 * MiB}})
    with pytest.raises(InvalidArgument, match="must be at least memory.limit"):
        v2_plan({"memory": {"limit": 64 * MiB, "swap": 32 * MiB}})


@pytest.mark.parametrize(
    ("cpu", "value"),
    [
        ({"quota": 50000, "period": 100000}, "50000 100000"),
        ({"quota": 50000}, "50000"),
        ({"quota": -1, "period": 100000}, "max 100000"),
        ({"period": 20000}, "max 20000"),
    ],
)
def test_v2_cpu_max(cpu, value):
    assert files(v2_plan({"cpu": cpu})) == [("cpu.max", value)]


def test_v2_cpu_weight_pids_cpuset():
    writes = v2_plan({"cpu": {"shares": 1024, "cpus": "0-1"}, "pids": {"limit": 10}})
    assert files(writes) == [("pids.max", "10"), ("cpu.weight", "39"), ("cpuset.cpus", "0-1")]


def test_v2_real_time_is_refused():
    with pytest.raises(InvalidArgument, match=r"cpu\.realtimeRuntime"):
        v2_plan({"cpu": {"realtimeRuntime": 1000}})


def test_v2_controller_not_delegated_names_the_field():
    with pytest.raises(InvalidArgument, match=r"cpu\.cpus: the cpuset controller"):
        v2_plan({"cpu": {"cpus": "0"}}, available=frozenset({"memory", "pids", "cpu"}))


def test_v2_devices_are_validated_not_written_as_files():
    assert v2_plan({"devices": [{"allow": False, "access": "rwm"}]}) == []
    with pytest.raises(InvalidArgument, match=r"devices\[0\]\.type"):
        v2_plan({"devices": [{"allow": True, "type": "z"}]})


def test_v2_unified():
    writes = v2_plan({"unified": {"memory.high": "50000000", "pids.max": "7"}})
    assert files(writes) == [("memory.high", "50000000"), ("pids.max", "7")]
    assert writes[0].field == "unified.memory.high"
    for key in ("cgroup.procs", "../x.max", "memory", "cgroup.subtree_control"):
        with pytest.raises(InvalidArgument, match="linux.resources.unified"):
            v2_plan({"unified": {key: "1"}})
    with pytest.raises(InvalidArgument, match="io controller"):
        v2_plan({"unified": {"io.max": "8:0 rbps=1"}}, available=frozenset({"memory"}))


def test_v2_io():
    writes = v2_plan(
        {
            "blockIO": {
                "weight": 1000,
                "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}],
            }
        }
    )
    assert files(writes) == [("io.weight", "10000"), ("io.max", "8:16 wiops=100")]
    bfq = v2_plan({"blockIO": {"weight": 300}}, weight_file="io.bfq.weight")
    assert files(bfq) == [("io.bfq.weight", "300")]  # BFQ keeps blkio's scale


# --- the block I/O weight file: whichever the kernel offers, or a clear error ---------------

WEIGHTS = {"weight": 500, "weightDevice": [{"major": 8, "minor": 0, "weight": 300}]}


def test_v1_weight_goes_to_the_file_the_kernel_offers():
    assert files(v1_plan({"blockIO": WEIGHTS}, weight_file="blkio.weight")) == [
        ("blkio.weight", "500"),
        ("blkio.weight_device", "8:0 300"),
    ]
    assert files(v1_plan({"blockIO": WEIGHTS}, weight_file="blkio.bfq.weight")) == [
        ("blkio.bfq.weight", "500"),
        ("blkio.bfq.weight_device", "8:0 300"),
    ]


@pytest.mark.parametrize(
    ("block_io", "field", "missing"),
    [
        ({"weight": 500}, "blockIO.weight", "blkio.weight and blkio.bfq.weight"),
        (
            {"weightDevice": WEIGHTS["weightDevice"]},
            r"blockIO.weightDevice\[0\].weight",
            "blkio.weight_device and blkio.bfq.weight_device",
        ),
    ],
)
def test_v1_weight_without_a_weight_file_names_the_field_and_the_files(block_io, field, missing):
    with pytest.raises(InvalidArgument, match=f"{field}: this kernel offers no block I/O weight"):
        v1_plan({"blockIO": block_io}, weight_file=None)
    with pytest.raises(InvalidArgument, match=f"{missing} are all missing"):
        v1_plan({"blockIO": block_io}, weight_file=None)
    # throttling needs no weight file
    throttle = {"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1}]}
    assert files(v1_plan({"blockIO": throttle}, weight_file=None)) == [
        ("blkio.throttle.read_bps_device", "8:0 1")
    ]


def test_v2_weight_without_a_weight_file_names_the_field_and_the_files():
    with pytest.raises(
        InvalidArgument,
        match=r"blockIO.weight: this kernel offers no block I/O weight: "
        r"io.bfq.weight and io.weight are all missing",
    ):
        v2_plan({"blockIO": {"weight": 500}}, weight_file=None)
    with pytest.raises(InvalidArgument, match=r"blockIO.weightDevice\[0\]: this kernel offers"):
        v2_plan({"blockIO": {"weightDevice": WEIGHTS["weightDevice"]}}, weight_file=None)
    # a missing io controller is named as such, not as missing weight files
    with pytest.raises(InvalidArgument, match=r"blockIO.weight: the io controller"):
        v2_plan({"blockIO": {"weight": 500}}, available=frozenset({"memory"}), weight_file=None)


def fake_group(directory, *names: str) -> str:
    """A plain directory standing in for a cgroup that offers exactly `names`."""
    directory.mkdir()
    for name in names:
        (directory / name).write_text("")
    return str(directory)


@pytest.mark.parametrize(
    ("offered", "written"),
    [
        (("blkio.weight", "blkio.weight_device", "blkio.bfq.weight"), "blkio.weight"),
        (("blkio.bfq.weight", "blkio.bfq.weight_device"), "blkio.bfq.weight"),
    ],
)
def test_v1_group_writes_the_weight_file_its_kernel_offers(tmp_path, offered, written):
    # a stand-in for the kernels this machine is not (CFQ before 5.0, or BFQ loaded)
    group = v1.CgroupV1({"blkio": fake_group(tmp_path / "blkio", *offered)})
    group.apply({"blockIO": WEIGHTS})
    assert (tmp_path / "blkio" / written).read_text() == "500"
    assert (tmp_path / "blkio" / f"{written}_device").read_text() == "8:0 300"


def test_v1_group_without_weight_files_refuses_a_weight_and_writes_nothing(tmp_path):
    # a stand-in for this machine's blkio groups: no CFQ, no BFQ
    group = v1.CgroupV1({"blkio": fake_group(tmp_path / "blkio", "blkio.leaf_weight")})
    with pytest.raises(InvalidArgument, match="blockIO.weight: this kernel offers no block I/O"):
        group.apply({"blockIO": WEIGHTS})
    assert sorted(p.name for p in (tmp_path / "blkio").iterdir()) == ["blkio.leaf_weight"]


@pytest.mark.parametrize(
    ("offered", "written", "value"),
    [
        (("io.weight",), "io.weight", "4950"),
        (("io.weight", "io.bfq.weight"), "io.bfq.weight", "500"),
    ],
)
def test_v2_group_writes_the_weight_file_its_kernel_offers(tmp_path, offered, written, value):
    directory = fake_group(tmp_path / "group", "cgroup.controllers", *offered)
    (tmp_path / "group" / "cgroup.controllers").write_text("io memory pids\n")
    v2.CgroupV2(directory).apply({"blockIO": {"weight": 500}})
    assert (tmp_path / "group" / written).read_text() == value


def test_v2_group_without_weight_files_refuses_a_weight(tmp_path):
    directory = fake_group(tmp_path / "group", "cgroup.controllers", "io.max")
    (tmp_path / "group" / "cgroup.controllers").write_text("io\n")
    with pytest.raises(InvalidArgument, match="io.bfq.weight and io.weight are all missing"):
        v2.CgroupV2(directory).apply({"blockIO": {"weight": 500}})


def test_settings_a_host_cannot_honour_come_back_as_notes():
    notes: list[str] = []
    writes = v1_plan(
        {"hugepageLimits": [{"pageSize": "2MB", "limit": 0}], "memory": {"kernel": 1 << 20}},
        available=frozenset({"memory"}),
        notes=notes,
    )
    assert writes == []
    assert any("hugepageLimits ignored" in n for n in notes)
    assert any("memory.kernel ignored" in n for n in notes)
    notes.clear()
    v2_plan({"network": {"classID": 1}}, notes=notes)
    assert any("network ignored" in n for n in notes)


@pytest.mark.parametrize("plan", [v1_plan, v2_plan])
@pytest.mark.parametrize(
    ("resources", "field"),
    [
        (
            {"hugepageLimits": [{"pageSize": "../../memory/x", "limit": 1}]},
            "hugepageLimits[0].pageSize",
        ),
        ({"hugepageLimits": [{"pageSize": "2MB", "limit": -1}]}, "hugepageLimits[0].limit"),
        (
            {"blockIO": {"throttleReadBpsDevice": [{"minor": 0, "rate": 1}]}},
            "throttleReadBpsDevice[0].major",
        ),
        (
            {"blockIO": {"weightDevice": [{"major": 8, "minor": "0", "weight": 5}]}},
            "weightDevice[0].minor",
        ),
        ({"blockIO": {"weight": -10}}, "blockIO.weight"),
    ],
)
def test_values_that_become_file_names_or_lines_are_checked(plan, resources, field):
    """A pageSize is part of a file name: "../" in it must never reach os.path.join."""
    with pytest.raises(InvalidArgument) as info:
        plan(resources)
    assert "linux.resources." in str(info.value) and field in str(info.value)


def _bytes_or_unlimited(value: int) -> float:
    return float("inf") if value == -1 else value


@given(
    current=st.tuples(st.integers(1, 2**40), st.integers(0, 2**40)),
    new=st.tuples(st.integers(1, 2**40), st.integers(0, 2**40)),
    unlimited_swap=st.booleans(),
)
def test_v1_memory_write_order_never_breaks_the_kernel_rule(current, new, unlimited_swap):
    """The kernel refuses any moment where memsw < memory: simulate it over the plan."""
    limit, memsw = current[0], current[0] + current[1]  # any valid starting state
    new_limit = new[0]
    new_swap = -1 if unlimited_swap else new[0] + new[1]
    writes = v1_plan({"memory": {"limit": new_limit, "swap": new_swap}}, current_memory_limit=limit)
    for write in writes:
        value = _bytes_or_unlimited(int(write.value))
        if write.file == "memory.limit_in_bytes":
            assert value <= memsw, f"limit {value} above memsw {memsw}: {writes}"
            limit = value
        else:
            assert value >= limit, f"memsw {value} below limit {limit}: {writes}"
            memsw = value
    assert (limit, memsw) == (new_limit, _bytes_or_unlimited(new_swap))


@given(st.text(alphabet="ab./:-_\x00", max_size=30))
def test_container_path_stays_strictly_below_its_base(given_path):
    """Whatever linux.cgroupsPath says, the group is a proper sub-group of its base."""
    try:
        path, _relative = cgroups.container_path(given_path, "c1")
    except InvalidArgument:
        return
    parts = path.split("/")
    assert path.startswith("/") and parts[0] == ""
    assert all(part not in ("", ".", "..") for part in parts[1:]), path
    assert len(parts) >= 2


# --- the v2 device program ------------------------------------------------------------------


def run_device_program(code: bytes, dev_type: int, major: int, minor: int, access: int) -> int:
    """Interprets the eBPF subset devices.program() emits, against one request."""
    import struct

    regs = [0] * 11
    ctx = {0: (access << 16) | dev_type, 4: major, 8: minor}
    pc, steps = 0, 0
    while True:
        steps += 1
        assert steps < 10_000, "runaway program"
        op, regbyte, off, imm = struct.unpack_from("<BBhi", code, pc * 8)
        dst, src = regbyte & 0xF, regbyte >> 4
        pc += 1
        if op == 0x61:
            assert src == 1
            regs[dst] = ctx[off]
        elif op == 0x54:
            regs[dst] = regs[dst] & (imm & 0xFFFFFFFF)
        elif op == 0x74:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> imm
        elif op == 0xBC:
            regs[dst] = regs[src] & 0xFFFFFFFF
        elif op == 0xB7:
            regs[dst] = imm
        elif op == 0x55:
            if regs[dst] != imm:
                pc += off
        elif op == 0x15:
            if regs[dst] == imm:
                pc += off
        elif op == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


def reference_decision(rules, dev_type: str, major: int, minor: int, access: str) -> bool:
    """Last matching rule wins; allow needs every bit asked for, deny any one of them."""
    default, exceptions = devices.policy(rules)
    for rule in reversed(exceptions):
        if rule.type != dev_type:
            continue
        if rule.major is not None and rule.major != major:
            continue
        if rule.minor is not None and rule.minor != minor:
            continue
        if rule.allow and set(access) <= set(rule.access):
            return True
        if not rule.allow and set(access) & set(rule.access):
            return False
    return default


BPF_TYPE = {"b": 1, "c": 2}


def bpf_access(access: str) -> int:
    return sum({"m": 1, "r": 2, "w": 4}[c] for c in set(access))


def test_default_device_program_allows_the_basic_nodes_only():
    code = devices.program(
        devices.container_rules(typed_rules([{"allow": False, "access": "rwm"}]))
    )
    allowed = lambda t, ma, mi, acc: run_device_program(code, BPF_TYPE[t], ma, mi, bpf_access(acc))  # noqa: E731
    assert allowed("c", 1, 3, "rw") == 1  # /dev/null
    assert allowed("c", 136, 7, "rw") == 1  # a pts
    assert allowed("c", 1, 11, "r") == 0  # /dev/kmsg
    assert allowed("b", 8, 0, "r") == 0  # a disk
    assert allowed("c", 1, 3, "m") == 1


rule_strategy = st.fixed_dictionaries(
    {
        "allow": st.booleans(),
        "type": st.sampled_from(["a", "b", "c"]),
        "major": st.sampled_from([None, 1, 8]),
        "minor": st.sampled_from([None, 0, 3]),
        "access": st.sampled_from(["r", "w", "m", "rw", "rm", "wm", "rwm"]),
    }
)


@given(
    st.lists(rule_strategy, max_size=6),
    st.sampled_from(["b", "c"]),
    st.sampled_from([1, 5, 8]),
    st.sampled_from([0, 3, 9]),
    st.sampled_from(["r", "w", "m", "rw", "rwm"]),
)
def test_device_program_decides_as_the_rules_say(config_rules, dev_type, major, minor, access):
    rules = devices.container_rules(typed_rules(config_rules))
    code = devices.program(rules)
    verdict = run_device_program(code, BPF_TYPE[dev_type], major, minor, bpf_access(access))
    assert verdict == int(reference_decision(rules, dev_type, major, minor, access))


def test_make_dirs_restarts_when_a_new_level_vanishes_mid_write(tmp_path):
    """A level removed between its mkdir and the writes into it (the shared /zviz parent
    taken by its last container's destroy) answers ENODEV on cgroupfs: walk again."""
    import errno as _errno

    from runtime.cgroups.common import make_dirs

    leaf = str(tmp_path / "zviz" / "c1")
    vanished = []

    def on_new_level(parent, level):
        if not vanished:
            vanished.append(level)
            raise OSError(_errno.ENODEV, "No such device")

    created: list[str] = []
    make_dirs(leaf, str(tmp_path), created, on_new_level)
    assert vanished == [str(tmp_path / "zviz")]
    assert (tmp_path / "zviz" / "c1").is_dir()
