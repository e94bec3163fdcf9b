"""runtime/features.py: the OCI features document, against runc's and against what zviz applies."""

import json
import shutil
import subprocess

import pytest

from runtime import rootfs, spec
from runtime.defaults import default_config
from runtime.errors import InvalidArgument
from runtime.features import capabilities, features


@pytest.fixture(scope="module")
def document():
    return features()


@pytest.fixture(scope="module")
def runc_document():
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed: nothing to compare the document's shape with")
    return json.loads(
        subprocess.run([runc, "features"], check=True, capture_output=True, text=True).stdout
    )


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "rootfs").mkdir()
    return str(tmp_path)


def test_document_is_json(document):
    assert json.loads(json.dumps(document)) == document


def test_has_every_key_runc_reports(document, runc_document):
    assert set(runc_document) <= set(document)
    assert set(runc_document["linux"]) <= set(document["linux"])
    for section in ("cgroup", "seccomp", "apparmor", "selinux"):
        assert set(runc_document["linux"][section]) <= set(document["linux"][section]), section
    for key, value in runc_document.items():
        assert type(document[key]) is type(value), key


def test_version_range_is_accepted_by_the_spec_parser(document, bundle):
    for key in ("ociVersionMin", "ociVersionMax"):
        config = default_config()
        config["ociVersion"] = document[key]
        assert spec.parse_spec(config, bundle).oci_version == document[key]


def test_capabilities_follow_the_kernel(document):
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    assert document["linux"]["capabilities"] == list(spec.CAPABILITIES[: last + 1])
    assert document["linux"]["capabilities"][0] == "CAP_CHOWN"


def test_capabilities_of_an_older_kernel(tmp_path):
    cap_last_cap = tmp_path / "cap_last_cap"
    cap_last_cap.write_text("37\n")
    names = capabilities(str(cap_last_cap))
    assert len(names) == 38 and names[-1] == "CAP_AUDIT_READ"


def test_capabilities_when_the_kernel_cannot_say(tmp_path):
    assert capabilities(str(tmp_path / "absent")) == list(spec.CAPABILITIES)


def test_every_listed_mount_option_is_a_flag_rootfs_applies(document):
    assert document["mountOptions"], "rootfs recognises at least ro, nosuid, bind"
    for option in document["mountOptions"]:
        assert option in spec.MOUNT_FLAG_OPTIONS, option
        flags, propagation, data = rootfs.parse_options([option])
        assert data == "", f"{option} would reach the filesystem as data, not as a flag"


def test_every_listed_namespace_parses(document, bundle):
    for ns_type in document["linux"]["namespaces"]:
        config = default_config()
        config["linux"]["namespaces"] = [{"type": ns_type}] + (
            [] if ns_type == "mount" else [{"type": "mount"}]
        )
        del config["hostname"]
        if ns_type == "user":
            config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 1}]
            config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 1}]
        assert spec.parse_spec(config, bundle).linux.namespaces[0].type == ns_type


def test_seccomp_lists_what_the_spec_accepts(document, bundle):
    seccomp = document["linux"]["seccomp"]
    assert seccomp["enabled"] is True
    assert "SCMP_ACT_NOTIFY" not in seccomp["actions"], (
        "config.json may not use the broker's listener"
    )
    assert set(seccomp["supportedFlags"]) <= set(seccomp["knownFlags"])
    assert "SECCOMP_FILTER_FLAG_SPEC_ALLOW" not in seccomp["supportedFlags"]
    config = default_config()
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": seccomp["archs"],
        "flags": seccomp["knownFlags"],
        "syscalls": [
            {
                "names": ["getpid"],
                "action": action,
                "args": [{"index": 0, "value": 1, "op": op} for op in seccomp["operators"][:6]],
            }
            for action in seccomp["actions"]
        ],
    }
    assert spec.parse_spec(config, bundle).linux.seccomp is not None
    config["linux"]["seccomp"]["syscalls"][0]["action"] = "SCMP_ACT_NOTIFY"
    with pytest.raises(InvalidArgument, match="listenerPath"):
        spec.parse_spec(config, bundle)


def test_unimplemented_layers_say_so(document):
    linux = document["linux"]
    assert linux["apparmor"] == {"enabled": False}
    assert linux["selinux"] == {"enabled": False}
    assert linux["intelRdt"] == {"enabled": False}
    assert linux["cgroup"]["systemd"] is False and linux["cgroup"]["v1"] is True


def test_every_oci_hook_is_listed(document):
    assert document["hooks"] == list(spec.HOOK_NAMES)
    assert len(document["hooks"]) == 6


def test_profile_annotation_is_flagged_unsafe(document):
    assert "io.zviz.profile" in document["potentiallyUnsafeConfigAnnotations"]
    assert document["annotations"]["io.zviz.profile.default"] == "ci-runner"
    assert "ci-runner" in document["annotations"]["io.zviz.profiles"].split(",")
    assert all(isinstance(v, str) for v in document["annotations"].values())


def test_every_mount_flag_the_spec_accepts_is_applied_by_rootfs():
    """spec.py lets a bind mount carry only these: one rootfs passed on as data would be dropped."""
    for option in spec.MOUNT_FLAG_OPTIONS:
        flags, propagation, data = rootfs.parse_options([option])
        assert data == "", f"{option} is accepted on bind mounts but rootfs does not apply it"
