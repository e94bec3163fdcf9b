"""Malformed configs, generated: each one parses into a Spec or raises InvalidArgument, nothing else.

A traceback from `zviz create` on a bad config.json is a bug: these tests look for one
with random JSON documents and with random damage done to a valid config.
"""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.defaults import default_config
from runtime.errors import InvalidArgument
from runtime.spec import Spec, check_process_in_spec, decode_json, parse_process, parse_spec

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.sampled_from([0, 1, -1, 2**32, 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["", "/", "..", "/a/../b", "rootfs", "CAP_KILL", "bind", "SCMP_ACT_ALLOW", "1.2.0", "\0"]
    )
    | st.sampled_from(
        [
            "\ud800",
            "a\udcff",
            "\n",
            "0-" + "9" * 5000,
            "²MB",
            "0-3,5",
            "net.ipv4.x",
            "/proc/self/ns/net",
        ]
    )
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _full_config():
    """The default config plus most optional sections, so mutations reach every reader."""
    config = default_config()
    config["domainname"] = "zviz.test"
    config["process"]["user"].update({"umask": 18, "additionalGids": [1, 2]})
    config["process"]["consoleSize"] = {"height": 24, "width": 80}
    config["process"]["ioPriority"] = {"class": "IOPRIO_CLASS_BE", "priority": 4}
    config["process"]["scheduler"] = {
        "policy": "SCHED_OTHER",
        "nice": 1,
        "flags": ["SCHED_FLAG_RECLAIM"],
    }
    config["process"]["oomScoreAdj"] = 10
    lx = config["linux"]
    lx["namespaces"] += [{"type": "user"}, {"type": "time"}]
    lx["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    lx["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    lx["timeOffsets"] = {"boottime": {"secs": 1, "nanosecs": 2}}
    lx["sysctl"] = {"net.ipv4.ip_forward": "1", "kernel.shmmax": "1"}
    lx["devices"] = [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}]
    lx["cgroupsPath"] = "/zviz-fuzz/x"
    lx["rootfsPropagation"] = "rprivate"
    lx["personality"] = {"domain": "LINUX", "flags": []}
    lx["resources"].update(
        {
            "memory": {"limit": 1 << 30, "reservation": 1 << 29, "swap": 1 << 31, "swappiness": 10},
            "cpu": {"shares": 1024, "quota": 100000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 100},
            "blockIO": {"weight": 100, "weightDevice": [{"major": 8, "minor": 0, "weight": 10}]},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 1}],
            "network": {"classID": 1, "priorities": [{"name": "lo", "priority": 1}]},
            "unified": {"memory.high": "max"},
        }
    )
    lx["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {
                "names": ["read"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            }
        ],
    }
    config["mounts"].append(
        {
            "destination": "/data",
            "source": "data",
            "options": ["rbind"],
            "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
        }
    )
    config["hooks"] = {
        "poststop": [{"path": "/bin/true", "args": ["true"], "env": ["A=1"], "timeout": 1}]
    }
    config["annotations"] = {"io.zviz.profile": "ci-runner"}
    return config


FULL_CONFIG = _full_config()


def _paths(value, prefix=()):
    """Every location in a JSON tree, as a tuple of keys and indexes."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


ALL_PATHS = list(_paths(FULL_CONFIG))[1:]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("zviz-spec-fuzz")
    (path / "rootfs").mkdir()
    return str(path)


def parses_or_refuses(config, bundle_dir):
    before = copy.deepcopy(config)
    try:
        spec = parse_spec(config, bundle_dir)
    except InvalidArgument as e:
        assert_readable(str(e))
        return None
    finally:
        assert config == before, "parsing changed the caller's config"
    assert_invariants(spec)
    assert spec.raw is config
    return spec


def assert_readable(message):
    """One printable line that any terminal can take, starting with the file it is about."""
    assert message.startswith("config.json: ")
    assert message.isprintable(), message
    message.encode("utf-8")


def assert_invariants(spec):
    """What every consumer of a Spec relies on, whatever config.json said."""
    assert isinstance(spec, Spec)
    assert spec.root.path.startswith("/")
    if spec.process is not None:
        assert spec.process.args and all(isinstance(a, str) for a in spec.process.args)
        assert spec.process.cwd.startswith("/") and ".." not in spec.process.cwd.split("/")
        for rlimit in spec.process.rlimits:
            assert 0 <= rlimit.soft <= rlimit.hard < 2**64
    for mount in spec.mounts:
        assert mount.destination.startswith("/") and mount.destination != "/"
        assert ".." not in mount.destination.split("/")
        assert all(isinstance(o, str) and o for o in mount.options)
        if mount.is_bind:
            assert mount.source.startswith("/")
    types = [ns.type for ns in spec.linux.namespaces]
    assert len(types) == len(set(types))
    for mapping in spec.linux.uid_mappings + spec.linux.gid_mappings:
        assert mapping.size >= 1 and mapping.container_id + mapping.size <= 2**32
    for path in spec.linux.masked_paths + spec.linux.readonly_paths:
        assert path.startswith("/") and ".." not in path.split("/")
    for key in spec.linux.sysctl:
        assert ".." not in key.replace("/", ".").split(".")
    if spec.linux.resources is not None:
        for key in spec.linux.resources.unified:
            assert "/" not in key


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(JSON_VALUES)
def test_random_json_documents(bundle, value):
    try:
        parse_spec(value, bundle)
    except InvalidArgument as e:
        assert_readable(str(e))


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(FULL_CONFIG)), JSON_VALUES, max_size=6))
def test_random_top_level_sections(bundle, sections):
    config = {"ociVersion": "1.2.0", "root": {"path": "rootfs"}, **sections}
    parses_or_refuses(config, bundle)


def _mutate(config, path, operation, junk):
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if operation == "delete":
        del parent[key]
    elif operation == "replace":
        parent[key] = junk
    elif operation == "insert" and isinstance(parent[key], dict):
        parent[key]["x-junk"] = junk
    elif operation == "insert" and isinstance(parent[key], list):
        parent[key].append(junk)
    elif operation == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif operation == "stringify":
        parent[key] = json.dumps(parent[key])
    elif operation == "negate" and type(parent[key]) is int:
        parent[key] = -parent[key] - 1


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(ALL_PATHS),
        st.sampled_from(["delete", "replace", "insert", "duplicate", "stringify", "negate"]),
        JSON_VALUES,
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(MUTATIONS)
def test_mutations_of_a_valid_config(bundle, mutations):
    config = copy.deepcopy(FULL_CONFIG)
    for path, operation, junk in mutations:
        try:
            _mutate(config, path, operation, junk)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    parses_or_refuses(config, bundle)


def test_full_config_is_valid(bundle):
    """The fuzzed base parses, so mutations start from a config that is accepted."""
    assert parses_or_refuses(copy.deepcopy(FULL_CONFIG), bundle) is not None


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_config_json(bundle, data):
    try:
        value = decode_json(data)
    except InvalidArgument as e:
        assert_readable(str(e))
        return
    try:
        parse_spec(value, bundle)
    except InvalidArgument:
        pass


MAPPINGS = st.lists(
    st.tuples(
        st.integers(min_value=-2, max_value=40),
        st.integers(min_value=-2, max_value=40),
        st.integers(min_value=-1, max_value=12),
    ),
    min_size=1,
    max_size=5,
)


def _mappings_oracle(triples):
    """Brute force: every id at most once on each side, all ids in range, no empty ranges."""
    seen_container, seen_host = set(), set()
    for container_id, host_id, size in triples:
        if container_id < 0 or host_id < 0 or size < 1:
            return False
        for offset in range(size):
            if container_id + offset in seen_container or host_id + offset in seen_host:
                return False
            seen_container.add(container_id + offset)
            seen_host.add(host_id + offset)
    return True


@FUZZ
@given(MAPPINGS)
def test_id_mappings_agree_with_a_brute_force_check(bundle, triples):
    config = default_config()
    config["linux"]["namespaces"].append({"type": "user"})
    mappings = [{"containerID": c, "hostID": h, "size": n} for c, h, n in triples]
    config["linux"]["uidMappings"] = mappings
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 1}]
    config["process"]["user"] = {"uid": 0, "gid": 0}
    expected = _mappings_oracle(triples)
    if expected and not any(c <= 0 < c + n for c, _, n in triples):
        expected = None  # valid maps, but uid 0 unmapped: refused for that instead
    spec = parses_or_refuses(config, bundle)
    if expected:
        assert spec is not None
        assert [(m.container_id, m.host_id, m.size) for m in spec.linux.uid_mappings] == triples
    else:
        assert spec is None


CPU_LISTS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20), st.none() | st.integers(min_value=0, max_value=20)
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(CPU_LISTS, st.sampled_from(["", ",", "-", " ", "x"]))
def test_cpu_lists_agree_with_their_definition(bundle, ranges, junk):
    text = ",".join(str(lo) if hi is None else f"{lo}-{hi}" for lo, hi in ranges)
    valid = all(hi is None or lo <= hi for lo, hi in ranges)
    config = default_config()
    config["linux"]["resources"]["cpu"] = {"cpus": text + junk}
    spec = parses_or_refuses(config, bundle)
    assert (spec is not None) == (valid and junk == "")


PROCESS_PATHS = list(_paths(FULL_CONFIG["process"]))[1:]


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PROCESS_PATHS),
            st.sampled_from(["delete", "replace", "insert", "duplicate", "stringify", "negate"]),
            JSON_VALUES,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_exec_process_mutations(bundle, mutations):
    """`zviz exec --process`: the same promise for a process document on its own."""
    process = copy.deepcopy(FULL_CONFIG["process"])
    for path, operation, junk in mutations:
        try:
            _mutate(process, path, operation, junk)
        except (KeyError, IndexError, TypeError):
            pass
    try:
        parsed = parse_process(process)
    except InvalidArgument as e:
        assert str(e).startswith("process.json: ") and str(e).isprintable()
        return
    assert parsed.args and parsed.cwd.startswith("/")
    spec = parse_spec(copy.deepcopy(FULL_CONFIG), bundle)
    try:
        check_process_in_spec(parsed, spec)
    except InvalidArgument as e:
        assert "is not mapped" in str(e)
