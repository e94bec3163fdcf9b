"""config.json that runc accepts: zviz runs it, or refuses naming the field and the rule.

Each case here is one that runc runs and zviz once refused (issue 14, item 5, and the
gaps the OCI conformance suite found); runc runs the same bundle beside zviz where the
behaviour compared is runc's.
"""

import os
import subprocess

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, unique_id
from runtime.security import profiles as profile_registry
from runtime.security.capabilities import mask as capability_mask


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture
def runc(runc_bin, tmp_path):
    root = str(tmp_path / tagged("runc-root"))

    def run(bundle: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [runc_bin, "--root", root, "run", "--bundle", bundle, unique_id()],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def _seccomp_denying_two_nice_levels(base: int) -> dict:
    """Allow all, but setpriority to base+5 or base+7: two conditions on one argument."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {
                "names": ["setpriority"],
                "action": "SCMP_ACT_ERRNO",
                "args": [
                    {"index": 2, "value": base + 5, "op": "SCMP_CMP_EQ"},
                    {"index": 2, "value": base + 7, "op": "SCMP_CMP_EQ"},
                ],
            }
        ],
    }


def test_seccomp_rule_with_two_conditions_on_one_argument_runs_as_under_runc(
    zviz, runc, make_bundle
):
    """libseccomp refuses two comparisons of one argument in a rule; runc adds one rule per
    condition, so either value is refused and others are not. zviz once failed `create`
    with `linux.seccomp.syscalls[0]: setpriority: Invalid argument`."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    # Debian's busybox has renice (no link to it) but no nice: each adjustment from base, in a shell of its own.
    script = (
        "for n in 3 5 7; do"
        ' sh -c "busybox renice -n $n -p \\$\\$" >/dev/null 2>&1 && echo $n=ok || echo $n=refused;'
        " done"
    )
    bundle = make_bundle(["sh", "-c", script])
    edit_config(bundle, lambda c: c["linux"].update(seccomp=_seccomp_denying_two_nice_levels(base)))
    expected = ["3=ok", "5=refused", "7=refused"]
    under_runc = runc(bundle)
    assert under_runc.stdout.split() == expected, under_runc.stderr
    under_zviz = zviz.run(bundle)
    assert under_zviz.returncode == 0, under_zviz.stderr
    assert under_zviz.stdout.split() == expected


def _runc_spec_bundle(runc_bin: str, make_bundle, args: list[str]) -> str:
    """The busybox rootfs with `runc spec`'s config.json, its process made non-interactive:
    `runc spec` asks for a terminal running `sh`, which a test has no one to type into."""
    bundle = make_bundle()
    os.remove(os.path.join(bundle, "config.json"))
    subprocess.run([runc_bin, "spec", "--bundle", bundle], check=True, timeout=30)
    edit_config(bundle, lambda c: c["process"].update(args=args, terminal=False))
    return bundle


def _capability_sets(status: str) -> dict[str, int]:
    return {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith("Cap")
    }


@pytest.mark.parametrize("profile", profile_registry.list_profiles())
def test_runc_spec_bundle_runs_under_every_profile(zviz, runc, runc_bin, make_bundle, profile):
    """`runc spec` lists ambient capabilities without inheritable ones; the kernel raises
    an ambient capability only when it is permitted and inheritable, and runc leaves such
    ones unraised. zviz once failed with `prctl(47): Operation not permitted` wherever the
    profile left one of them (web-server: CAP_NET_BIND_SERVICE; development)."""
    bundle = _runc_spec_bundle(runc_bin, make_bundle, ["grep", "^Cap", "/proc/self/status"])
    under_runc = runc(bundle)
    assert under_runc.returncode == 0, under_runc.stderr
    assert _capability_sets(under_runc.stdout)["CapAmb"] == 0
    result = zviz("--profile", profile, "run", "--bundle", bundle, unique_id())
    assert result.returncode == 0, result.stderr
    sets = _capability_sets(result.stdout)
    assert sets["CapAmb"] == 0
    # What the profile lets through of runc's default set stays permitted: only the
    # ambient copy is gone.
    allowed = profile_registry.load_profile(profile).capabilities
    asked = {"CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"}
    assert sets["CapPrm"] == capability_mask(asked & set(allowed))


def test_bind_mount_with_tmpfs_style_data_options_runs_as_under_runc(
    zviz, runc, make_bundle, tmp_path
):
    """The OCI suite's `mounts` program puts a tmpfs's options (mode=755, size=1k) on bind
    mounts too: the kernel ignores data on a bind and runc runs it. zviz once refused with
    `unknown mount option 'mode=755' (a bind mount takes only mount flags)`."""
    source = tmp_path / tagged("bind-source")
    source.mkdir()
    (source / "marker").write_text("from the host\n")
    bundle = make_bundle(["cat", "/mnt/bound/marker"])
    options = ["nosuid", "strictatime", "mode=755", "size=1k", "bind", "ro"]
    mount = {"destination": "/mnt/bound", "source": str(source), "options": options}
    edit_config(bundle, lambda c: c["mounts"].append(mount))
    under_runc = runc(bundle)
    assert under_runc.returncode == 0, under_runc.stderr
    under_zviz = zviz.run(bundle)
    assert under_zviz.returncode == 0, under_zviz.stderr
    assert under_zviz.stdout == under_runc.stdout == "from the host\n"


def test_bind_mount_with_an_unknown_bare_option_is_refused_naming_it(zviz, make_bundle, tmp_path):
    """A bare word that is no mount flag is a typo (the kernel would drop it without a word):
    still refused, naming the field."""
    bundle = make_bundle(["true"])
    mount = {"destination": "/mnt/bound", "source": str(tmp_path), "options": ["bind", "readonly"]}
    edit_config(bundle, lambda c: c["mounts"].append(mount))
    result = zviz.run(bundle)
    assert result.returncode != 0
    assert "options[1]: unknown mount option 'readonly'" in result.stderr


@pytest.mark.parametrize("ns_type, proc_name", [("mount", "mnt"), ("pid", "pid")])
def test_joining_a_host_owned_namespace_is_refused_naming_the_profile_rule(
    zviz, make_bundle, ns_type, proc_name
):
    """runc joins a namespace given by path as host root (the OCI suite's linux_ns_path);
    from ci-runner's own user namespace the container has no privilege in the host's
    mount or pid namespace. zviz once failed halfway (`rootfs: mount(/): Operation not
    permitted`); the refusal now names the field and the profile's rule. The test joins
    a namespace of this (host-owned) test process: zviz refuses before it mounts."""
    bundle = make_bundle(["true"])
    path = f"/proc/{os.getpid()}/ns/{proc_name}"

    def join(config):
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == ns_type:
                ns["path"] = path

    edit_config(bundle, join)
    result = zviz("--profile", "ci-runner", "run", "--bundle", bundle, unique_id())
    assert result.returncode != 0
    assert f"linux.namespaces: a {ns_type} namespace given by path" in result.stderr
    assert "profile ci-runner runs every container in a user namespace" in result.stderr
