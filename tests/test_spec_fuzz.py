"""Malformed configs, generated: each one parses into a Spec or raises InvalidArgument, nothing else.

A traceback from `zviz create` on a bad config.json is a bug: these tests look for one
with random JSON documents and with random damage done to a valid config. A config that
parses must give a Spec whose every field has its annotated type and a sane range, and
that the same JSON decoded afresh parses to again; one that is refused must be refused
with a message naming the damaged field (or, for a rule between fields, the other one
naming it).
"""

import copy
import dataclasses
import json
import re
import types
import typing

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.defaults import default_config
from runtime.errors import InvalidArgument
from runtime.spec import (
    Process,
    Spec,
    check_process_in_spec,
    decode_json,
    parse_process,
    parse_spec,
)

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


def parses_or_refuses(config, bundle_dir, changed=None):
    """Parse `config`: a Spec that keeps every invariant, or an InvalidArgument whose
    message names one of the `changed` locations (tuples of keys and indexes), if given."""
    before = copy.deepcopy(config)
    try:
        spec = parse_spec(config, bundle_dir)
    except InvalidArgument as e:
        assert_readable(str(e))
        if changed is not None:
            assert names_a_changed_field(str(e), changed), (str(e), changed)
        return None
    finally:
        assert config == before, "parsing changed the caller's config"
    assert_invariants(spec)
    # The Spec depends on the JSON value only: the same document, decoded afresh, parses
    # to the same Spec (repr: a NaN kept in a free-form section equals itself there).
    again = parse_spec(json.loads(json.dumps(config)), bundle_dir)
    assert repr(again) == repr(spec)
    return spec


# One step of a location in an error message: `.name`, `[3]` or `["free-form key"]`.
PATH_STEP = re.compile(r'\.?([^\W\d]\w*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def error_location(message: str) -> tuple[tuple, str]:
    """("linux", "resources", "memory", "limit"), "must be ..." from
    "config.json: linux.resources.memory.limit: must be ..."."""
    rest = message.removeprefix("config.json: ").removeprefix("process.json: ")
    steps, at = [], 0
    while not rest.startswith(": ", at) and (step := PATH_STEP.match(rest, at)):
        name, index, quoted = step.groups()
        steps.append(name if name else int(index) if index else free_form_key(quoted))
        at = step.end()
    return tuple(steps), rest[at:].removeprefix(": ")


def free_form_key(quoted: str) -> str:
    try:
        return json.loads(quoted)
    except ValueError:  # made printable ("\x7f"): not JSON any more, nor the key itself
        return quoted[1:-1]


def names_a_changed_field(message: str, changed) -> bool:
    """The message is about a changed location: at it, inside it or at the object or
    list holding it, or at another entry of that list (a duplicate is named where it is
    met); or (a rule between two fields) its text names the changed field."""
    where, problem = error_location(message)
    for path in changed:
        if where[: len(path)] == path or (where and where == path[:-1]):
            return True
        in_a_list = path and isinstance(path[-1], int)
        if in_a_list and len(where) >= len(path) and where[: len(path) - 1] == path[:-1]:
            return True
        names = [step for step in path if isinstance(step, str)]
        if names and names[-1] in problem:
            return True
        # A rule naming the list the changed entry is in ("0 is not mapped by
        # linux.gidMappings" after a mapping's containerID changed).
        first_index = next((i for i, step in enumerate(path) if isinstance(step, int)), None)
        if first_index is not None and first_index >= 2:
            if ".".join(path[:first_index]) in problem:
                return True
    return False


def changed_location(path, operation):
    """Where a mutation leaves its mark: a duplicate is a new entry of the list."""
    return path[:-1] if operation == "duplicate" else path


def assert_readable(message):
    """One printable line that any terminal can take, starting with the file it is about."""
    assert message.startswith("config.json: ")
    assert message.isprintable(), message
    message.encode("utf-8")


INT64, UINT64, UINT32 = 2**63, 2**64, 2**32


def assert_typed(value, hint, where: str) -> None:
    """`value` is exactly what the Spec's annotation says (bool is no int, an int fits 64 bits)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return assert_typed(value, arm, where)
            except AssertionError:
                continue
        raise AssertionError(f"{where}: {value!r} is not {hint}")
    if hint is type(None):
        assert value is None, f"{where}: {value!r} is not None"
    elif dataclasses.is_dataclass(hint):
        assert type(value) is hint, f"{where}: {value!r} is not a {hint.__name__}"
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            if f.name != "raw":
                assert_typed(getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
    elif origin is list:
        assert type(value) is list, f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            assert_typed(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        assert type(value) is dict, f"{where}: {value!r} is not a dict"
        for key, item in value.items():
            assert_typed(key, args[0], f"{where} key")
            assert_typed(item, args[1], f"{where}[{key!r}]")
    elif origin is tuple:
        assert type(value) is tuple and len(value) == len(args), f"{where}: {value!r}"
        for i, (item, arm) in enumerate(zip(value, args, strict=True)):
            assert_typed(item, arm, f"{where}[{i}]")
    else:
        assert type(value) is hint, f"{where}: {value!r} is not {hint.__name__}"
        if hint is int:
            assert -INT64 <= value < UINT64, f"{where}: {value} does not fit 64 bits"


def assert_invariants(spec):
    """What every consumer of a Spec relies on, whatever config.json said."""
    assert isinstance(spec, Spec)
    assert_typed(spec, Spec, "spec")
    assert spec.root.path.startswith("/")
    if spec.process is not None:
        assert spec.process.args and all(isinstance(a, str) for a in spec.process.args)
        assert spec.process.cwd.startswith("/") and ".." not in spec.process.cwd.split("/")
        for rlimit in spec.process.rlimits:
            assert 0 <= rlimit.soft <= rlimit.hard < 2**64
        user = spec.process.user
        assert all(0 <= i < UINT32 for i in [user.uid, user.gid, *user.additional_gids])
        assert user.umask is None or 0 <= user.umask <= 0o7777
        assert spec.process.oom_score_adj is None or -1000 <= spec.process.oom_score_adj <= 1000
        assert spec.process.console_size is None or min(spec.process.console_size) >= 0
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
        assert 0 <= mapping.host_id and mapping.host_id + mapping.size <= 2**32
    for device in spec.linux.devices:
        assert device.type in ("c", "b", "u", "p") and device.path.startswith("/dev/")
        assert 0 <= device.major < UINT32 and 0 <= device.minor < UINT32
    for path in spec.linux.masked_paths + spec.linux.readonly_paths:
        assert path.startswith("/") and ".." not in path.split("/")
    for key in spec.linux.sysctl:
        assert ".." not in key.replace("/", ".").split(".")
    if spec.linux.resources is not None:
        for key in spec.linux.resources.unified:
            assert "/" not in key
        memory, pids = spec.linux.resources.memory, spec.linux.resources.pids
        if memory is not None and memory.swappiness is not None:
            assert 0 <= memory.swappiness <= 100
        if memory is not None and memory.swap is not None and memory.swap != -1:
            assert memory.limit is not None and memory.swap >= memory.limit
        if pids is not None and pids.limit is not None:
            assert pids.limit >= -1


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
    # A section left out is a change too (from FULL_CONFIG): errors may be about it.
    changed = [(key,) for key in FULL_CONFIG if key in sections or key not in config]
    parses_or_refuses(config, bundle, changed)


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
# Found by the type and range invariants: a negative device number was accepted, and
# `zviz create` then failed in os.mknod with a traceback.
@example([(("linux", "devices", 0, "major"), "negate", None)])
def test_mutations_of_a_valid_config(bundle, mutations):
    config = copy.deepcopy(FULL_CONFIG)
    changed = []
    for path, operation, junk in mutations:
        try:
            _mutate(config, path, operation, junk)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
        changed.append(changed_location(path, operation))
    parses_or_refuses(config, bundle, changed)


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
    changed = []
    for path, operation, junk in mutations:
        try:
            _mutate(process, path, operation, junk)
        except (KeyError, IndexError, TypeError):
            continue
        changed.append(changed_location(path, operation))
    try:
        parsed = parse_process(process)
    except InvalidArgument as e:
        assert str(e).startswith("process.json: ") and str(e).isprintable()
        assert names_a_changed_field(str(e), changed), (str(e), changed)
        return
    assert_typed(parsed, Process, "process")
    assert parsed.args and parsed.cwd.startswith("/")
    spec = parse_spec(copy.deepcopy(FULL_CONFIG), bundle)
    try:
        check_process_in_spec(parsed, spec)
    except InvalidArgument as e:
        assert "is not mapped" in str(e)
