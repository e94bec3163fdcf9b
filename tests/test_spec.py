"""runtime/spec.py: config.json -> Spec, and every rule that rejects a config naming its field."""

import json
import os
import re
import shutil
import subprocess

import pytest

from runtime.defaults import default_config
from runtime.errors import InvalidArgument
from runtime.spec import (
    CAPABILITIES,
    Spec,
    check_process_in_spec,
    load_spec,
    parse_process,
    parse_spec,
)
from tools.mkbundle import build_bundle


@pytest.fixture
def bundle(tmp_path):
    """A bundle with an empty rootfs: parse_spec only needs the directory to exist."""
    (tmp_path / "rootfs").mkdir()
    return str(tmp_path)


def parse(config, bundle_dir):
    return parse_spec(config, bundle_dir)


def userns_config():
    config = default_config()
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    return config


# --- what parses ---


def test_default_config_parses(bundle):
    spec = parse(default_config(args=["echo", "hi"]), bundle)
    assert isinstance(spec, Spec)
    assert spec.oci_version == "1.2.0"
    assert spec.process.args == ["echo", "hi"]
    assert spec.process.cwd == "/"
    assert spec.process.user.uid == 0 and spec.process.user.gid == 0
    assert spec.process.no_new_privileges is True
    assert spec.process.capabilities.bounding == [
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
    ]
    assert spec.process.capabilities.ambient == []
    assert [(r.type, r.soft, r.hard) for r in spec.process.rlimits] == [
        ("RLIMIT_NOFILE", 1024, 1024)
    ]
    assert spec.hostname == "zviz"
    assert [m.destination for m in spec.mounts][:2] == ["/proc", "/dev"]
    assert spec.mounts[1].options == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    assert [ns.type for ns in spec.linux.namespaces] == [
        "pid",
        "network",
        "ipc",
        "uts",
        "mount",
        "cgroup",
    ]
    assert all(ns.path is None for ns in spec.linux.namespaces)
    rule = spec.linux.resources.devices[0]
    assert (rule.allow, rule.type, rule.major, rule.minor, rule.access) == (
        False,
        "a",
        None,
        None,
        "rwm",
    )
    assert "/proc/kcore" in spec.linux.masked_paths
    assert "/proc/sys" in spec.linux.readonly_paths
    assert spec.process.args == ["echo", "hi"]


def test_root_path_is_resolved_against_the_bundle(bundle):
    spec = parse(default_config(), bundle)
    assert spec.root.path == os.path.join(os.path.realpath(bundle), "rootfs")
    assert spec.root.readonly is True
    assert spec.bundle == os.path.abspath(bundle)


def test_root_path_symlink_is_resolved(bundle, tmp_path_factory):
    real = tmp_path_factory.mktemp("zviz-spec-realroot")
    os.symlink(real, os.path.join(bundle, "link"))
    config = default_config()
    config["root"]["path"] = "link"
    assert parse(config, bundle).root.path == os.path.realpath(real)


def test_absolute_root_path_is_kept(bundle, tmp_path_factory):
    other = tmp_path_factory.mktemp("zviz-spec-absroot")
    config = default_config()
    config["root"]["path"] = str(other)
    assert parse(config, bundle).root.path == os.path.realpath(other)


def test_relative_bind_source_is_resolved_against_the_bundle(bundle):
    config = default_config()
    config["mounts"].append({"destination": "/data", "source": "data", "options": ["rbind", "ro"]})
    config["mounts"].append({"destination": "/etc/x", "type": "bind", "source": "/etc/hostname"})
    spec = parse(config, bundle)
    data, etc = spec.mounts[-2], spec.mounts[-1]
    assert (
        data.is_bind
        and data.type == ""
        and data.source == os.path.join(os.path.abspath(bundle), "data")
    )
    assert etc.is_bind and etc.source == "/etc/hostname"
    assert not spec.mounts[0].is_bind


@pytest.mark.parametrize(
    ("mount_type", "options", "bind"),
    [
        ("bind", [], True),
        ("", ["rbind", "ro"], True),
        ("none", ["bind"], True),
        ("tmpfs", ["nosuid", "bind"], True),  # a bind option makes any type a bind
        ("tmpfs", ["nosuid", "mode=755"], False),
        ("proc", [], False),
    ],
)
def test_spec_and_rootfs_ask_one_function_whether_a_mount_is_a_bind(mount_type, options, bind):
    """The spec (validation, egress's resolv.conf) and rootfs (bind sources, mounting) once
    decided it each by their own rule: now both ask rootfs.is_bind."""
    from runtime import rootfs
    from runtime.spec import Mount

    assert Mount("/x", mount_type, "/src", list(options)).is_bind is bind
    assert rootfs.is_bind(rootfs.Mount("/x", mount_type, "/src", options)) is bind
    assert rootfs.BIND_OPTIONS == {"bind", "rbind"}  # read off rootfs's one option table


def test_mount_destination_is_normalised(bundle):
    config = default_config()
    config["mounts"].append({"destination": "/run//x/./y/", "type": "tmpfs", "source": "tmpfs"})
    assert parse(config, bundle).mounts[-1].destination == "/run/x/y"


def test_full_featured_config_parses(bundle):
    config = userns_config()
    config["domainname"] = "example.org"
    p = config["process"]
    p.update(
        {
            "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1000, "gid": 1000, "umask": 0o22, "additionalGids": [5, 6]},
            "oomScoreAdj": 100,
            "apparmorProfile": "unconfined",
            "ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 4},
            "scheduler": {"policy": "SCHED_BATCH", "nice": 5},
        }
    )
    p["capabilities"]["ambient"] = ["CAP_KILL"]
    p["rlimits"].append({"type": "RLIMIT_CORE", "soft": 0, "hard": 2**64 - 1})
    lx = config["linux"]
    lx["namespaces"].append({"type": "time"})
    lx["timeOffsets"] = {"monotonic": {"secs": 10, "nanosecs": 5}}
    lx["sysctl"] = {
        "net.ipv4.ip_forward": "1",
        "kernel.shmmax": "100000",
        "fs.mqueue.msg_max": "20",
        "kernel.domainname": "x",
        "net/ipv4/ping_group_range": "0 0",
    }
    lx["cgroupsPath"] = "/zviz-test/abc"
    lx["rootfsPropagation"] = "rslave"
    lx["devices"] = [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666}
    ]
    lx["resources"].update(
        {
            "memory": {
                "limit": 256 << 20,
                "reservation": 128 << 20,
                "swap": 512 << 20,
                "swappiness": 0,
            },
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 64},
            "blockIO": {
                "weight": 500,
                "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}],
            },
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "network": {"classID": 1, "priorities": [{"name": "eth0", "priority": 1}]},
            "unified": {"memory.high": "100M"},
        }
    )
    lx["resources"]["devices"].append(
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}
    )
    lx["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        ],
    }
    lx["personality"] = {"domain": "LINUX"}
    config["mounts"].append(
        {
            "destination": "/data",
            "type": "bind",
            "source": "/tmp",
            "options": ["rbind"],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 1}],
        }
    )
    config["hooks"] = {"createRuntime": [{"path": "/bin/true", "args": ["true"], "timeout": 5}]}
    config["annotations"] = {"io.zviz.profile": "ci-runner"}

    spec = parse(config, bundle)
    assert spec.process.console_size == (24, 80)
    assert spec.process.user.umask == 0o22 and spec.process.user.additional_gids == [5, 6]
    assert spec.process.oom_score_adj == 100
    assert spec.process.rlimits[1].hard == 2**64 - 1
    assert spec.linux.uid_mappings[0].host_id == 100000 and spec.linux.gid_mappings[0].size == 65536
    assert spec.linux.creates_namespace("user") and spec.linux.creates_namespace("time")
    assert spec.linux.time_offsets["monotonic"]["secs"] == 10
    mem, cpu = spec.linux.resources.memory, spec.linux.resources.cpu
    assert (mem.limit, mem.reservation, mem.swap, mem.swappiness) == (
        256 << 20,
        128 << 20,
        512 << 20,
        0,
    )
    assert (cpu.quota, cpu.period, cpu.cpus) == (50000, 100000, "0-1")
    assert spec.linux.resources.pids.limit == 64
    assert spec.linux.resources.unified == {"memory.high": "100M"}
    assert (
        spec.linux.resources.devices[1].major == 1
        and spec.linux.resources.devices[1].access == "rw"
    )
    assert spec.linux.devices[0].file_mode == 0o666
    assert spec.linux.seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert spec.linux.cgroups_path == "/zviz-test/abc"
    assert spec.mounts[-1].uid_mappings[0].host_id == 100000
    assert spec.hooks["createRuntime"][0]["path"] == "/bin/true"
    assert spec.annotations == {"io.zviz.profile": "ci-runner"}


@pytest.mark.parametrize(
    "version", ["1.0.0", "1.0.2-dev", "1.1.0", "1.2.0", "1.2.1", "1.3.0", "1.1.0-rc.1+dev"]
)
def test_supported_oci_versions(bundle, version):
    config = default_config()
    config["ociVersion"] = version
    assert parse(config, bundle).oci_version == version


def test_absent_process_is_allowed(bundle):
    config = default_config()
    del config["process"]
    assert parse(config, bundle).process is None


def test_null_reads_as_absent(bundle):
    config = default_config()
    config["annotations"] = None
    config["process"]["rlimits"] = None
    config["linux"]["resources"] = None
    spec = parse(config, bundle)
    assert spec.annotations == {} and spec.process.rlimits == [] and spec.linux.resources is None


def test_unknown_keys_are_ignored(bundle):
    config = default_config()
    config["x-vendor"] = {"anything": [1, 2]}
    config["process"]["commandLine"] = "ignored on linux"
    spec = parse(config, bundle)
    assert spec.process.args == default_config()["process"]["args"]
    # Nothing keeps config.json's raw dict: every reader takes the typed spec.
    assert not hasattr(spec, "raw")


def test_every_capability_name_is_known(bundle):
    config = default_config()
    config["process"]["capabilities"]["bounding"] = list(CAPABILITIES)
    assert len(CAPABILITIES) == 41
    assert parse(config, bundle).process.capabilities.bounding[-1] == "CAP_CHECKPOINT_RESTORE"


def test_real_bundle_from_mkbundle_parses(tmp_path):
    bundle_dir = build_bundle(str(tmp_path / "bundle"), args=["/bin/true"])
    spec = load_spec(bundle_dir)
    assert spec.process.args == ["/bin/true"]
    assert os.path.isfile(os.path.join(spec.root.path, "bin", "busybox"))


def test_parsing_creates_nothing(bundle):
    before = sorted(os.listdir(bundle))
    config = default_config()
    config["mounts"].append({"destination": "/data", "source": "data", "options": ["bind"]})
    parse(config, bundle)
    assert sorted(os.listdir(bundle)) == before


# --- load_spec errors ---


def write_config(bundle_dir, text):
    with open(os.path.join(bundle_dir, "config.json"), "w") as f:
        f.write(text)


def test_load_missing_config(bundle):
    with pytest.raises(InvalidArgument, match=r"^config.json: not found in bundle"):
        load_spec(bundle)


def test_load_malformed_json_names_line_and_column(bundle):
    write_config(bundle, '{\n  "ociVersion": "1.2.0",\n  "root" {}\n}')
    with pytest.raises(
        InvalidArgument, match=r"^config.json: not valid JSON: .* at line 3 column 10"
    ):
        load_spec(bundle)


def test_load_non_utf8(bundle):
    with open(os.path.join(bundle, "config.json"), "wb") as f:
        f.write(b'{"ociVersion": "\xff"}')
    with pytest.raises(InvalidArgument, match=r"^config.json: not valid UTF-8"):
        load_spec(bundle)


def test_load_deeply_nested_json(bundle):
    write_config(bundle, "[" * 100000 + "]" * 100000)
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        load_spec(bundle)


def test_load_round_trip(bundle):
    write_config(bundle, json.dumps(default_config(args=["id"])))
    assert load_spec(bundle).process.args == ["id"]


@pytest.mark.parametrize("top", [[], "x", 1, None])
def test_top_level_must_be_an_object(bundle, top):
    with pytest.raises(InvalidArgument, match=r"^config.json: must be a JSON object"):
        parse(top, bundle)


# --- each rule: a bad config is refused, naming the field ---


def _set(path):
    """A mutation that sets config[path] (dotted, with [i] for list items) to a value."""

    def setter(value):
        def mutate(config):
            target = config
            keys = _split(path)
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value

        return mutate

    return setter


def _split(path):
    keys = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        if name:
            keys.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            keys.append(int(index))
            rest = rest.lstrip("[")
    return keys


def _delete(path):
    def mutate(config):
        target = config
        keys = _split(path)
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return mutate


def _append(path, value):
    def mutate(config):
        target = config
        for key in _split(path):
            target = target.setdefault(key, []) if isinstance(target, dict) else target[key]
        target.append(value)

    return mutate


def _all(*mutations):
    def mutate(config):
        for m in mutations:
            m(config)

    return mutate


def _userns(config):
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]


def _resources(key, value):
    def mutate(config):
        config["linux"]["resources"][key] = value

    return mutate


BAD_CONFIGS = {
    # ociVersion
    "ociVersion missing": (_delete("ociVersion"), "ociVersion: is required"),
    "ociVersion 0.x": (_set("ociVersion")("0.9.0"), "ociVersion: version 0.9.0 is not supported"),
    "ociVersion 2.x": (_set("ociVersion")("2.0.0"), "ociVersion: version 2.0.0 is not supported"),
    "ociVersion not semver": (_set("ociVersion")("1.2"), "ociVersion: must be a semantic version"),
    "ociVersion junk": (_set("ociVersion")("latest"), "ociVersion: must be a semantic version"),
    "ociVersion number": (_set("ociVersion")(1), "ociVersion: must be a string, got an integer"),
    # root
    "root missing": (_delete("root"), "root: is required"),
    "root not object": (_set("root")("rootfs"), "root: must be an object, got a string"),
    "root.path missing": (_delete("root.path"), "root.path: is required"),
    "root.path empty": (_set("root.path")(""), "root.path: is required"),
    "rootfs absent": (_set("root.path")("nope"), "root.path: .*/nope does not exist"),
    "rootfs is a file": (
        _set("root.path")("/etc/hostname"),
        "root.path: /etc/hostname is not a directory",
    ),
    "root.readonly string": (
        _set("root.readonly")("yes"),
        "root.readonly: must be true or false, got a string",
    ),
    # process
    "process not object": (_set("process")([]), "process: must be an object, got a list"),
    "args missing": (_delete("process.args"), "process.args: must be a non-empty list of strings"),
    "args empty": (_set("process.args")([]), "process.args: must be a non-empty list of strings"),
    "args string": (
        _set("process.args")("sh"),
        "process.args: must be a non-empty list of strings",
    ),
    "args item int": (
        _set("process.args")(["sh", 1]),
        r"process.args\[1\]: must be a string, got an integer",
    ),
    "args[0] empty": (_set("process.args")([""]), r"process.args\[0\]: must name the program"),
    "args NUL": (_set("process.args")(["a\0b"]), r"process.args\[0\]: must not contain a NUL byte"),
    "cwd missing": (_delete("process.cwd"), "process.cwd: is required"),
    "cwd relative": (
        _set("process.cwd")("tmp"),
        "process.cwd: must be an absolute path, got 'tmp'",
    ),
    "cwd dotdot": (_set("process.cwd")("/a/../b"), "process.cwd: must not contain '..'"),
    "terminal string": (
        _set("process.terminal")("true"),
        "process.terminal: must be true or false",
    ),
    "uid string": (
        _set("process.user.uid")("0"),
        "process.user.uid: must be an integer, got a string",
    ),
    "uid negative": (
        _set("process.user.uid")(-1),
        "process.user.uid: must be an integer from 0 to 4294967295",
    ),
    "uid overflow": (
        _set("process.user.uid")(2**32),
        "process.user.uid: must be an integer from 0",
    ),
    "uid float": (
        _set("process.user.uid")(1.0),
        "process.user.uid: must be an integer, got a number",
    ),
    "uid bool": (
        _set("process.user.uid")(True),
        "process.user.uid: must be an integer, got a boolean",
    ),
    "umask too big": (
        _set("process.user.umask")(0o1000),
        "process.user.umask: must be an integer from 0 to 511",
    ),
    "additionalGids item": (
        _set("process.user.additionalGids")([1, "2"]),
        r"process.user.additionalGids\[1\]: must be an integer",
    ),
    "env not list": (_set("process.env")("A=B"), "process.env: must be a list, got a string"),
    "env no =": (
        _set("process.env")(["PATH=/bin", "JUNK"]),
        r"process.env\[1\]: must be NAME=VALUE, got 'JUNK'",
    ),
    "env empty name": (_set("process.env")(["=x"]), r"process.env\[0\]: must be NAME=VALUE"),
    "consoleSize string": (
        _set("process.consoleSize")({"height": "1"}),
        "process.consoleSize.height: must be an integer",
    ),
    "capabilities not object": (
        _set("process.capabilities")([]),
        "process.capabilities: must be an object",
    ),
    "unknown capability": (
        _set("process.capabilities.bounding")(["CAP_KILL", "CAP_FLY"]),
        r"process.capabilities.bounding\[1\]: unknown capability 'CAP_FLY'",
    ),
    "lowercase capability": (
        _set("process.capabilities.ambient")(["cap_kill"]),
        r"process.capabilities.ambient\[0\]: unknown capability 'cap_kill'",
    ),
    "capability number 41": (
        _set("process.capabilities.permitted")(["CAP_41"]),
        r"process.capabilities.permitted\[0\]: unknown capability",
    ),
    "rlimit unknown": (
        _set("process.rlimits")([{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]),
        r"process.rlimits\[0\].type: unknown rlimit 'RLIMIT_FOO'",
    ),
    "rlimit type missing": (
        _set("process.rlimits")([{"soft": 1, "hard": 1}]),
        r"process.rlimits\[0\].type: is required",
    ),
    "rlimit soft > hard": (
        _set("process.rlimits")([{"type": "RLIMIT_NOFILE", "soft": 2048, "hard": 1024}]),
        r"process.rlimits\[0\].soft: must not exceed hard \(2048 > 1024\)",
    ),
    "rlimit duplicate": (
        _append("process.rlimits", {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}),
        r"process.rlimits\[1\].type: RLIMIT_NOFILE is given twice",
    ),
    "rlimit hard missing": (
        _set("process.rlimits")([{"type": "RLIMIT_NOFILE", "soft": 1024}]),
        r"process.rlimits\[0\].hard: is required",
    ),
    "rlimit negative": (
        _set("process.rlimits")([{"type": "RLIMIT_CORE", "soft": -1, "hard": 0}]),
        r"process.rlimits\[0\].soft: must be an integer from 0",
    ),
    "noNewPrivileges int": (
        _set("process.noNewPrivileges")(1),
        "process.noNewPrivileges: must be true or false",
    ),
    "oomScoreAdj range": (
        _set("process.oomScoreAdj")(1001),
        "process.oomScoreAdj: must be an integer from -1000 to 1000",
    ),
    "ioPriority class": (
        _set("process.ioPriority")({"class": "IOPRIO_CLASS_FAST"}),
        "process.ioPriority.class: must be one of",
    ),
    "scheduler policy": (
        _set("process.scheduler")({"policy": "SCHED_X"}),
        "process.scheduler.policy: must be one of",
    ),
    "scheduler nice": (
        _set("process.scheduler")({"policy": "SCHED_OTHER", "nice": 40}),
        "process.scheduler.nice: must be an integer from -20 to 19",
    ),
    # hostname / domainname
    "hostname without uts": (
        _set("linux.namespaces")([{"type": "pid"}, {"type": "mount"}]),
        "hostname: cannot be set without a uts namespace",
    ),
    "domainname without uts": (
        _all(
            _set("linux.namespaces")([{"type": "mount"}]),
            _delete("hostname"),
            _set("domainname")("x"),
        ),
        "domainname: cannot be set without a uts namespace",
    ),
    "hostname too long": (_set("hostname")("h" * 65), "hostname: must be at most 64 bytes"),
    "hostname int": (_set("hostname")(5), "hostname: must be a string, got an integer"),
    # mounts
    "mounts not list": (_set("mounts")({}), "mounts: must be a list, got an object"),
    "mount not object": (_set("mounts[0]")("/proc"), r"mounts\[0\]: must be an object"),
    "mount destination missing": (
        _delete("mounts[2].destination"),
        r"mounts\[2\].destination: is required",
    ),
    "mount destination relative": (
        _set("mounts[0].destination")("proc"),
        r"mounts\[0\].destination: must be an absolute path",
    ),
    "mount destination root": (
        _set("mounts[0].destination")("/"),
        r"mounts\[0\].destination: must not be /",
    ),
    "mount destination root normalised": (
        _set("mounts[0].destination")("//."),
        r"mounts\[0\].destination: must not be /",
    ),
    "mount destination dotdot": (
        _set("mounts[1].destination")("/dev/../etc"),
        r"mounts\[1\].destination: must not contain '..'",
    ),
    "mount options not list": (
        _set("mounts[1].options")("nosuid"),
        r"mounts\[1\].options: must be a list, got a string",
    ),
    "mount option not string": (
        _set("mounts[1].options")(["nosuid", 7]),
        r"mounts\[1\].options\[1\]: must be a string",
    ),
    "mount option empty": (
        _set("mounts[1].options")([""]),
        r"mounts\[1\].options\[0\]: must be a non-empty string",
    ),
    "mount type missing": (
        _delete("mounts[0].type"),
        r"mounts\[0\].type: is required unless options contain bind",
    ),
    "bind with a typo option": (
        _append(
            "mounts", {"destination": "/x", "source": "/tmp", "options": ["rbind", "readonly"]}
        ),
        r"mounts\[7\].options\[1\]: unknown mount option 'readonly' \(a bind mount takes only mount flags\)",
    ),
    "bind with a recursive read-only": (
        _append("mounts", {"destination": "/x", "source": "/tmp", "options": ["rbind", "rro"]}),
        r"mounts\[7\].options\[1\]: mount option 'rro' is not supported by zviz",
    ),
    "tmpfs with idmap": (
        _append(
            "mounts",
            {"destination": "/x", "type": "tmpfs", "source": "tmpfs", "options": ["idmap"]},
        ),
        r"mounts\[7\].options\[0\]: mount option 'idmap' is not supported by zviz",
    ),
    "bind with a propagation typo": (
        _append(
            "mounts", {"destination": "/x", "type": "bind", "source": "/tmp", "options": ["rshare"]}
        ),
        r"mounts\[7\].options\[0\]: unknown mount option 'rshare'",
    ),
    "bind without source": (
        _append("mounts", {"destination": "/x", "options": ["bind"]}),
        r"mounts\[7\].source: is required for a bind mount",
    ),
    "idmapped mount without gid mappings": (
        _append(
            "mounts",
            {
                "destination": "/x",
                "source": "/tmp",
                "options": ["bind"],
                "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
            },
        ),
        r"mounts\[7\].gidMappings: is required with an id-mapped mount",
    ),
    "idmapped mount not bind": (
        _append(
            "mounts",
            {
                "destination": "/x",
                "type": "tmpfs",
                "source": "tmpfs",
                "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
                "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
            },
        ),
        r"mounts\[7\].uidMappings: id-mapped mounts must be bind mounts",
    ),
    "idmapped mount bad size": (
        _append(
            "mounts",
            {
                "destination": "/x",
                "source": "/tmp",
                "options": ["rbind"],
                "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 0}],
                "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
            },
        ),
        r"mounts\[7\].uidMappings\[0\].size: must be a positive integer",
    ),
    "proc bind over /proc": (
        _set("mounts[0]")({"destination": "/proc", "source": "/proc", "options": ["rbind"]}),
        r"mounts\[0\].type: a mount on /proc must be a new proc mount",
    ),
    "tmpfs over /proc": (
        _set("mounts[0]")({"destination": "/proc", "type": "tmpfs", "source": "tmpfs"}),
        r"mounts\[0\].type: a mount on /proc must be a new proc mount",
    ),
    "bind over /proc/sys": (
        _append(
            "mounts", {"destination": "/proc/sys", "source": "/tmp", "options": ["rbind", "rw"]}
        ),
        r"mounts\[7\].destination: /proc/sys is inside /proc: only /proc/cpuinfo",
    ),
    "tmpfs over a masked /proc file": (
        _append("mounts", {"destination": "/proc/kcore", "type": "tmpfs", "source": "tmpfs"}),
        r"mounts\[7\].destination: /proc/kcore is inside /proc",
    ),
    "effective not permitted": (
        _set("process.capabilities.effective")(["CAP_KILL", "CAP_SYS_ADMIN"]),
        r"process.capabilities.effective\[1\]: CAP_SYS_ADMIN must also be in permitted",
    ),
    "hook env": (
        _set("hooks")({"poststart": [{"path": "/bin/true", "env": ["NOEQUALS"]}]}),
        r"hooks.poststart\[0\].env\[0\]: must be NAME=VALUE",
    ),
    # namespaces
    "no mount namespace": (
        _set("linux.namespaces")([{"type": "pid"}, {"type": "uts"}]),
        "linux.namespaces: a mount namespace is required",
    ),
    "no linux section": (
        _all(_delete("linux"), _delete("hostname")),
        "linux.namespaces: a mount namespace is required",
    ),
    "selinux process label": (
        _set("process.selinuxLabel")("system_u:system_r:container_t:s0"),
        "process.selinuxLabel: SELinux labels are not supported by zviz",
    ),
    "selinux mount label": (
        _set("linux.mountLabel")("system_u:object_r:container_file_t:s0"),
        "linux.mountLabel: SELinux labels are not supported by zviz",
    ),
    "namespaces not list": (
        _set("linux.namespaces")({"type": "pid"}),
        "linux.namespaces: must be a list",
    ),
    "namespace unknown": (
        _append("linux.namespaces", {"type": "pidx"}),
        r"linux.namespaces\[6\].type: unknown namespace 'pidx'",
    ),
    "namespace duplicate": (
        _append("linux.namespaces", {"type": "pid"}),
        r"linux.namespaces\[6\].type: namespace 'pid' is listed twice",
    ),
    "namespace type missing": (
        _append("linux.namespaces", {}),
        r"linux.namespaces\[6\].type: is required",
    ),
    "namespace path absent": (
        _set("linux.namespaces[1]")(
            {"type": "network", "path": "/run/zviz-spec-test/no-such-netns"}
        ),
        r"linux.namespaces\[1\].path: /run/zviz-spec-test/no-such-netns does not exist",
    ),
    "namespace path relative": (
        _set("linux.namespaces[1]")({"type": "network", "path": "proc/1/ns/net"}),
        r"linux.namespaces\[1\].path: must be an absolute path",
    ),
    # id mappings
    "mappings without userns": (
        _set("linux.uidMappings")([{"containerID": 0, "hostID": 1000, "size": 1}]),
        "linux.uidMappings: needs a user namespace",
    ),
    "userns without mappings": (
        _append("linux.namespaces", {"type": "user"}),
        "linux.uidMappings: is required with a new user namespace",
    ),
    "userns without gid mappings": (
        _all(_userns, _delete("linux.gidMappings")),
        "linux.gidMappings: is required with a new user namespace",
    ),
    "userns path plus uid mappings alone": (
        _all(
            _userns,
            _set("linux.namespaces[6].path")("/proc/self/ns/user"),
            _delete("linux.gidMappings"),
        ),
        "linux.gidMappings: is required with uidMappings when joining a user namespace",
    ),
    "mapping size 0": (
        _all(_userns, _set("linux.uidMappings[0].size")(0)),
        r"linux.uidMappings\[0\].size: must be a positive integer",
    ),
    "mapping size negative": (
        _all(_userns, _set("linux.gidMappings[0].size")(-5)),
        r"linux.gidMappings\[0\].size: must be a positive integer",
    ),
    "mapping hostID negative": (
        _all(_userns, _set("linux.uidMappings[0].hostID")(-1)),
        r"linux.uidMappings\[0\].hostID: must be an integer from 0 to 4294967295",
    ),
    "mapping hostID overflow": (
        _all(_userns, _set("linux.uidMappings[0].hostID")(2**32 - 10)),
        r"linux.uidMappings\[0\].size: hostID \+ size overflows",
    ),
    "mapping containerID overflow": (
        _all(_userns, _set("linux.uidMappings[0].containerID")(2**32 - 1)),
        r"linux.uidMappings\[0\].size: containerID \+ size overflows",
    ),
    "mapping field missing": (
        _all(_userns, _delete("linux.uidMappings[0].hostID")),
        r"linux.uidMappings\[0\].hostID: is required",
    ),
    "mapping string": (
        _all(_userns, _set("linux.uidMappings[0].size")("65536")),
        r"linux.uidMappings\[0\].size: must be a positive integer",
    ),
    "mappings overlap in container": (
        _all(
            _userns,
            _append("linux.uidMappings", {"containerID": 100, "hostID": 500000, "size": 10}),
        ),
        r"linux.uidMappings\[1\]: containerID range overlaps linux.uidMappings\[0\]",
    ),
    "mappings overlap on host": (
        _all(
            _userns,
            _append("linux.gidMappings", {"containerID": 70000, "hostID": 100010, "size": 10}),
        ),
        r"linux.gidMappings\[1\]: hostID range overlaps linux.gidMappings\[0\]",
    ),
    "too many mappings": (
        _all(
            _userns,
            _set("linux.uidMappings")(
                [{"containerID": i, "hostID": 100000 + i, "size": 1} for i in range(341)]
            ),
        ),
        "linux.uidMappings: at most 340 mappings",
    ),
    "process uid unmapped": (
        _all(_userns, _set("process.user.uid")(70000)),
        "process.user.uid: 70000 is not mapped by linux.uidMappings",
    ),
    "process additional gid unmapped": (
        _all(_userns, _set("process.user.additionalGids")([1, 70000])),
        r"process.user.additionalGids\[1\]: 70000 is not mapped by linux.gidMappings",
    ),
    # paths
    "maskedPaths relative": (
        _append("linux.maskedPaths", "proc/kcore"),
        r"linux.maskedPaths\[11\]: must be an absolute path",
    ),
    "maskedPaths not list": (
        _set("linux.maskedPaths")("/proc"),
        "linux.maskedPaths: must be a list",
    ),
    "readonlyPaths relative": (
        _set("linux.readonlyPaths")(["/proc/bus", "sys"]),
        r"linux.readonlyPaths\[1\]: must be an absolute path",
    ),
    "readonlyPaths item int": (
        _set("linux.readonlyPaths")([1]),
        r"linux.readonlyPaths\[0\]: must be a string",
    ),
    # devices
    "device path relative": (
        _set("linux.devices")([{"path": "dev/fuse", "type": "c", "major": 10, "minor": 229}]),
        r"linux.devices\[0\].path: must be an absolute path",
    ),
    "device type unknown": (
        _set("linux.devices")([{"path": "/dev/x", "type": "z", "major": 1, "minor": 1}]),
        r"linux.devices\[0\].type: must be c, b, u or p",
    ),
    "device major missing": (
        _set("linux.devices")([{"path": "/dev/x", "type": "c", "minor": 1}]),
        r"linux.devices\[0\].major: is required for a device of type 'c'",
    ),
    "device fileMode": (
        _set("linux.devices")([{"path": "/dev/x", "type": "p", "fileMode": 0o10000}]),
        r"linux.devices\[0\].fileMode: must be an integer from 0 to 4095",
    ),
    # sysctl
    "sysctl not namespaced": (
        _set("linux.sysctl")({"vm.swappiness": "1"}),
        r'linux.sysctl\["vm.swappiness"\]: is not namespaced',
    ),
    "sysctl kernel.hostname": (
        _set("linux.sysctl")({"kernel.hostname": "x"}),
        r'linux.sysctl\["kernel.hostname"\]: is not allowed',
    ),
    "sysctl ipc without ipc ns": (
        _all(
            _set("linux.namespaces")([{"type": "uts"}, {"type": "mount"}]),
            _set("linux.sysctl")({"kernel.shmmax": "1"}),
        ),
        r'linux.sysctl\["kernel.shmmax"\]: needs an ipc namespace',
    ),
    "sysctl net without net ns": (
        _all(
            _set("linux.namespaces")([{"type": "uts"}, {"type": "mount"}]),
            _set("linux.sysctl")({"net.ipv4.ip_forward": "1"}),
        ),
        r'linux.sysctl\["net.ipv4.ip_forward"\]: needs a network namespace',
    ),
    "sysctl net in host netns by path": (
        _all(
            _set("linux.namespaces[1]")({"type": "network", "path": "/proc/self/ns/net"}),
            _set("linux.sysctl")({"net.ipv4.ip_forward": "1"}),
        ),
        r"linux.sysctl\[\"net.ipv4.ip_forward\"\]: cannot be set in the host's network namespace",
    ),
    "sysctl domainname without uts": (
        _all(
            _set("linux.namespaces")([{"type": "ipc"}, {"type": "mount"}]),
            _delete("hostname"),
            _set("linux.sysctl")({"kernel.domainname": "x"}),
        ),
        r'linux.sysctl\["kernel.domainname"\]: is not namespaced',
    ),
    "sysctl path escape": (
        _set("linux.sysctl")({"net/../../kernel/x": "1"}),
        r'linux.sysctl\["net/../../kernel/x"\]: is not a valid sysctl name',
    ),
    "sysctl empty part": (
        _set("linux.sysctl")({"net..x": "1"}),
        r'linux.sysctl\["net..x"\]: is not a valid sysctl name',
    ),
    "sysctl value int": (
        _set("linux.sysctl")({"net.ipv4.ip_forward": 1}),
        r'linux.sysctl\["net.ipv4.ip_forward"\]: must be a string',
    ),
    # resources
    "resources not object": (_set("linux.resources")([]), "linux.resources: must be an object"),
    "memory limit negative": (
        _resources("memory", {"limit": -2}),
        "linux.resources.memory.limit: must be -1 \\(unlimited\\)",
    ),
    "memory limit string": (
        _resources("memory", {"limit": "1G"}),
        "linux.resources.memory.limit: must be an integer, got a string",
    ),
    "memory reservation > limit": (
        _resources("memory", {"limit": 64 << 20, "reservation": 128 << 20}),
        "linux.resources.memory.reservation: must not exceed limit",
    ),
    "memory swap < limit": (
        _resources("memory", {"limit": 128 << 20, "swap": 64 << 20}),
        "linux.resources.memory.swap: must be at least memory.limit",
    ),
    "memory swap without limit": (
        _resources("memory", {"swap": 64 << 20}),
        "linux.resources.memory.swap: needs memory.limit",
    ),
    "memory swappiness": (
        _resources("memory", {"swappiness": 101}),
        "linux.resources.memory.swappiness: must be an integer from 0 to 100",
    ),
    "memory disableOOMKiller": (
        _resources("memory", {"disableOOMKiller": "true"}),
        "linux.resources.memory.disableOOMKiller: must be true or false",
    ),
    "cpu quota without period": (
        _resources("cpu", {"quota": 50000, "period": 0}),
        "linux.resources.cpu.period: must be set \\(not 0\\) with a cpu quota",
    ),
    "cpu quota tiny": (
        _resources("cpu", {"quota": 10, "period": 100000}),
        "linux.resources.cpu.quota: must be at least 1000",
    ),
    "cpu quota negative": (
        _resources("cpu", {"quota": -2}),
        "linux.resources.cpu.quota: must be -1",
    ),
    "cpu period range": (
        _resources("cpu", {"period": 10}),
        "linux.resources.cpu.period: must be from 1000 to 1000000",
    ),
    "cpu shares negative": (
        _resources("cpu", {"shares": -1}),
        "linux.resources.cpu.shares: must be an integer from 0",
    ),
    "cpus syntax": (
        _resources("cpu", {"cpus": "0-"}),
        "linux.resources.cpu.cpus: must be a list like \"0-3,5\", got '0-'",
    ),
    "cpus reversed range": (
        _resources("cpu", {"cpus": "3-1"}),
        "linux.resources.cpu.cpus: must be a list like",
    ),
    "mems syntax": (
        _resources("cpu", {"mems": "0,,1"}),
        "linux.resources.cpu.mems: must be a list like",
    ),
    "cpus letters": (
        _resources("cpu", {"cpus": "all"}),
        "linux.resources.cpu.cpus: must be a list like",
    ),
    "cpu idle": (
        _resources("cpu", {"idle": 2}),
        "linux.resources.cpu.idle: must be an integer from 0 to 1",
    ),
    "pids limit": (_resources("pids", {"limit": -5}), "linux.resources.pids.limit: must be -1"),
    "pids limit string": (
        _resources("pids", {"limit": "10"}),
        "linux.resources.pids.limit: must be an integer",
    ),
    "device rule allow missing": (
        _resources("devices", [{"access": "rwm"}]),
        r"linux.resources.devices\[0\].allow: is required",
    ),
    "device rule access": (
        _resources("devices", [{"allow": False, "access": "rwx"}]),
        r"linux.resources.devices\[0\].access: must combine r, w and m, got 'rwx'",
    ),
    "device rule type": (
        _resources("devices", [{"allow": False, "type": "p"}]),
        r"linux.resources.devices\[0\].type: must be a, b or c",
    ),
    "device rule major": (
        _resources("devices", [{"allow": True, "type": "c", "major": "1"}]),
        r"linux.resources.devices\[0\].major: must be an integer",
    ),
    "unified escape": (
        _resources("unified", {"../memory.max": "1"}),
        r'linux.resources.unified\["../memory.max"\]: must be a controller file',
    ),
    "unified cgroup.procs": (
        _resources("unified", {"cgroup.procs": "1"}),
        r'linux.resources.unified\["cgroup.procs"\]: must be a controller file such as memory.max',
    ),
    "unified controller only": (
        _resources("unified", {"memory.": "1"}),
        r'linux.resources.unified\["memory."\]: must be a controller file',
    ),
    "unified value int": (
        _resources("unified", {"memory.max": 1}),
        r'linux.resources.unified\["memory.max"\]: must be a string',
    ),
    "blockIO weight": (
        _resources("blockIO", {"weight": "high"}),
        "linux.resources.blockIO.weight: must be an integer",
    ),
    "hugepage pageSize": (
        _resources("hugepageLimits", [{"pageSize": "big", "limit": 1}]),
        r"linux.resources.hugepageLimits\[0\].pageSize: must look like",
    ),
    # The kernel names hugetlb files in KB, MB or GB only: a TB size names no file.
    "hugepage pageSize in TB": (
        _resources("hugepageLimits", [{"pageSize": "1TB", "limit": 1}]),
        r"linux.resources.hugepageLimits\[0\].pageSize: must look like .* got '1TB'",
    ),
    # The rules below were the cgroup plans' alone before the plans took the typed spec.
    "hugepage limit missing": (
        _resources("hugepageLimits", [{"pageSize": "2MB"}]),
        r"linux.resources.hugepageLimits\[0\].limit: is required",
    ),
    "blockIO throttle rate missing": (
        _resources("blockIO", {"throttleReadBpsDevice": [{"major": 8, "minor": 0}]}),
        r"linux.resources.blockIO.throttleReadBpsDevice\[0\].rate: is required",
    ),
    "blockIO negative major": (
        _resources("blockIO", {"weightDevice": [{"major": -8, "minor": 0, "weight": 10}]}),
        r"linux.resources.blockIO.weightDevice\[0\].major: must be an integer from 0",
    ),
    "network priority name with a space": (
        _resources("network", {"priorities": [{"name": "eth0 9", "priority": 1}]}),
        r"linux.resources.network.priorities\[0\].name: must be an interface name",
    ),
    "device rule major beyond 32 bits": (
        _resources("devices", [{"allow": True, "type": "c", "major": 1 << 31}]),
        r"linux.resources.devices\[0\].major: must be an integer from -1",
    ),
    "network classID": (
        _resources("network", {"classID": -1}),
        "linux.resources.network.classID: must be an integer from 0",
    ),
    # other linux fields
    "cgroupsPath dotdot": (
        _set("linux.cgroupsPath")("/zviz/../../x"),
        "linux.cgroupsPath: must not contain '..'",
    ),
    "cgroupsPath root": (
        _set("linux.cgroupsPath")("//"),
        "linux.cgroupsPath: must name a cgroup below the root",
    ),
    "cgroupsPath int": (_set("linux.cgroupsPath")(1), "linux.cgroupsPath: must be a string"),
    "rootfsPropagation unknown": (
        _set("linux.rootfsPropagation")("rshared2"),
        "linux.rootfsPropagation: must be one of",
    ),
    "personality domain": (
        _set("linux.personality")({"domain": "BSD"}),
        "linux.personality.domain: must be one of",
    ),
    "timeOffsets without time ns": (
        _set("linux.timeOffsets")({"monotonic": {"secs": 1}}),
        "linux.timeOffsets: needs a new time namespace",
    ),
    "timeOffsets unknown clock": (
        _all(
            _append("linux.namespaces", {"type": "time"}),
            _set("linux.timeOffsets")({"realtime": {"secs": 1}}),
        ),
        "linux.timeOffsets.realtime: unknown clock",
    ),
    # seccomp
    "seccomp defaultAction missing": (
        _set("linux.seccomp")({}),
        "linux.seccomp.defaultAction: is required",
    ),
    "seccomp defaultAction unknown": (
        _set("linux.seccomp")({"defaultAction": "SCMP_ACT_MAYBE"}),
        "linux.seccomp.defaultAction: unknown seccomp action 'SCMP_ACT_MAYBE'",
    ),
    "seccomp arch unknown": (
        _set("linux.seccomp")(
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}
        ),
        r"linux.seccomp.architectures\[0\]: unknown architecture 'SCMP_ARCH_Z80'",
    ),
    "seccomp names empty": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}],
            }
        ),
        r"linux.seccomp.syscalls\[0\].names: must be a non-empty list",
    ),
    "seccomp names string": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": "read", "action": "SCMP_ACT_ERRNO"}],
            }
        ),
        r"linux.seccomp.syscalls\[0\].names: must be a non-empty list",
    ),
    "seccomp rule action": (
        _set("linux.seccomp")(
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"]}]}
        ),
        r"linux.seccomp.syscalls\[0\].action: is required",
    ),
    "seccomp arg index": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            }
        ),
        r"linux.seccomp.syscalls\[0\].args\[0\].index: must be an integer from 0 to 5",
    ),
    "seccomp arg op": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "op": "SCMP_CMP_XX"}],
                    }
                ],
            }
        ),
        r"linux.seccomp.syscalls\[0\].args\[0\].op: unknown operator 'SCMP_CMP_XX'",
    ),
    "seccomp errnoRet with allow": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}],
            }
        ),
        r"linux.seccomp.syscalls\[0\].errnoRet: is only meaningful with SCMP_ACT_ERRNO",
    ),
    "seccomp notify without listener": (
        _set("linux.seccomp")(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}],
            }
        ),
        "linux.seccomp.listenerPath: is required when an action is SCMP_ACT_NOTIFY",
    ),
    "seccomp flag unknown": (
        _set("linux.seccomp")(
            {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_FAST"]}
        ),
        r"linux.seccomp.flags\[0\]: unknown seccomp flag",
    ),
    # hooks, annotations
    "hooks unknown name": (_set("hooks")({"preboot": []}), "hooks.preboot: unknown hook"),
    "hook path relative": (
        _set("hooks")({"poststop": [{"path": "bin/true"}]}),
        r"hooks.poststop\[0\].path: must be an absolute path",
    ),
    "hook path missing": (
        _set("hooks")({"prestart": [{"args": []}]}),
        r"hooks.prestart\[0\].path: is required",
    ),
    "hook timeout zero": (
        _set("hooks")({"prestart": [{"path": "/bin/true", "timeout": 0}]}),
        r"hooks.prestart\[0\].timeout: must be an integer from 1",
    ),
    "annotations value int": (
        _set("annotations")({"a": 1}),
        r'annotations\["a"\]: must be a string, got an integer',
    ),
    "annotations list": (_set("annotations")(["a"]), "annotations: must be an object, got a list"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_is_refused_naming_the_field(bundle, name):
    mutate, message = BAD_CONFIGS[name]
    config = default_config()
    mutate(config)
    with pytest.raises(InvalidArgument, match=r"^config.json: " + message):
        parse(config, bundle)


def test_error_reads_as_zviz_prints_it(bundle):
    config = default_config()
    config["process"]["args"] = []
    with pytest.raises(InvalidArgument) as info:
        parse(config, bundle)
    assert (
        f"zviz: {info.value}"
        == "zviz: config.json: process.args: must be a non-empty list of strings"
    )


# --- exec processes (zviz exec --process) ---


def test_parse_process_alone():
    process = parse_process({"args": ["ls"], "cwd": "/tmp", "env": ["A=1"]})
    assert process.args == ["ls"] and process.cwd == "/tmp" and process.capabilities is None


def test_parse_process_names_its_source():
    with pytest.raises(InvalidArgument, match=r"^process.json: cwd: must be an absolute path"):
        parse_process({"args": ["ls"], "cwd": "tmp"})
    with pytest.raises(InvalidArgument, match=r"^process.json: process: must be an object"):
        parse_process(["ls"])


def test_exec_process_must_use_mapped_ids(bundle):
    spec = parse(userns_config(), bundle)
    check_process_in_spec(
        parse_process({"args": ["id"], "cwd": "/", "user": {"uid": 5, "gid": 5}}), spec
    )
    unmapped = parse_process({"args": ["id"], "cwd": "/", "user": {"uid": 70000, "gid": 0}})
    with pytest.raises(InvalidArgument, match=r"^process.json: user.uid: 70000 is not mapped"):
        check_process_in_spec(unmapped, spec)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("hostname")("\ud800"), "hostname: must be valid Unicode"),
        (_set("annotations")({"k": "\udcff"}), r'annotations\["k"\]: must be valid Unicode'),
        (_set("hooks")({"pre\nstart": []}), r'hooks\["pre\\nstart"\]: unknown hook'),
        (
            _set("linux.sysctl")({"net.\ud800": "1"}),
            r'linux.sysctl\["net.\\ud800"\]: must be valid Unicode',
        ),
    ],
)
def test_messages_stay_one_printable_line(bundle, mutate, message):
    config = default_config()
    mutate(config)
    with pytest.raises(InvalidArgument, match=r"^config.json: " + message) as info:
        parse(config, bundle)
    assert str(info.value).isprintable()
    str(info.value).encode("utf-8")


def test_unified_key_with_dotted_name_reads_as_map_entry(bundle):
    config = default_config()
    config["linux"]["resources"]["unified"] = {"memory": "1"}
    with pytest.raises(
        InvalidArgument,
        match=r'^config.json: linux.resources.unified\["memory"\]: must be a controller file',
    ):
        parse(config, bundle)


def test_huge_cpu_number_is_refused_not_crashed(bundle):
    config = default_config()
    config["linux"]["resources"]["cpu"] = {"cpus": "0-" + "9" * 5000}
    with pytest.raises(
        InvalidArgument, match=r"^config.json: linux.resources.cpu.cpus: must be a list like"
    ):
        parse(config, bundle)


def test_lxcfs_files_under_proc_may_be_covered(bundle, tmp_path_factory):
    source = tmp_path_factory.mktemp("zviz-spec-lxcfs") / "meminfo"
    source.write_text("MemTotal: 1 kB\n")
    config = default_config()
    config["mounts"].append(
        {"destination": "/proc/meminfo", "source": str(source), "options": ["bind", "ro"]}
    )
    assert parse(config, bundle).mounts[-1].destination == "/proc/meminfo"


def test_joining_a_namespace_by_path(bundle):
    config = default_config()
    config["linux"]["namespaces"][1] = {"type": "network", "path": "/proc/self/ns/net"}
    assert parse(config, bundle).linux.namespace("network").path == "/proc/self/ns/net"
    assert not parse(config, bundle).linux.creates_namespace("network")


def _tool_output(*argv, cwd=None):
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed: no real-world config to read")
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


def test_runc_spec_output_parses(bundle):
    _tool_output("runc", "spec", "--bundle", bundle)
    spec = load_spec(bundle)
    # whatever runc is installed: the version it writes is the spec it says it implements
    said = re.search(r"^spec: (\S+)$", _tool_output("runc", "--version"), re.MULTILINE)
    assert said, "runc --version names no spec version"
    assert spec.oci_version == said.group(1)
    assert re.fullmatch(r"1\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?", spec.oci_version)
    assert spec.process.args == ["sh"] and spec.process.terminal is True
    assert spec.root.path == os.path.join(os.path.realpath(bundle), "rootfs")


def test_containerd_default_spec_parses_once_the_image_gives_args(bundle):
    config = json.loads(_tool_output("ctr", "oci", "spec"))
    with pytest.raises(
        InvalidArgument, match=r"^config.json: process.args: must be a non-empty list"
    ):
        parse(config, bundle)
    config["process"]["args"] = ["/bin/sh", "-c", "true"]
    spec = parse(config, bundle)
    assert spec.linux.cgroups_path == "/default"
    assert "CAP_NET_RAW" in spec.process.capabilities.bounding


def test_bind_mount_takes_defaults_as_a_no_op(bundle):
    config = default_config()
    config["mounts"].append(
        {"destination": "/x", "source": "/tmp", "options": ["rbind", "defaults", "ro"]}
    )
    assert parse(config, bundle).mounts[-1].options == ["rbind", "defaults", "ro"]


def test_filesystem_data_passes_on_other_mounts(bundle):
    config = default_config()
    config["mounts"].append(
        {
            "destination": "/x",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["size=1m", "uid=5", "acl"],
        }
    )
    assert parse(config, bundle).mounts[-1].options == ["size=1m", "uid=5", "acl"]
