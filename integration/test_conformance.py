"""A few of the OCI conformance suite's programs (tools/conformance.py) under zviz and runc.

`make conformance` runs all 58 side by side (a few minutes); these are the
representative ones that must keep passing under both: the lifecycle (create, state,
kill, delete), a cgroup limit, and a config whose seccomp filter has several conditions
on one argument (every program's default config has one). Where the suite asks for
what zviz refuses under every profile, the failure must name the rule.
"""

import pytest

from integration.ids import tagged
from tools import conformance, gotools

# Each passes under runc and zviz's default profile.
REPRESENTATIVE = (
    "create",
    "state",
    "kill",
    "delete_resources",
    "config_updates_without_affect",
    "linux_cgroups_pids",
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if gotools.binary(gotools.RUNTIME_TOOLS, "runtimetest") is None:
        pytest.skip(gotools.missing_reason(gotools.RUNTIME_TOOLS))
    workdir = tmp_path_factory.mktemp(tagged("conformance"))
    try:
        yield conformance.Suite(str(workdir))
    finally:
        conformance.unmount_below(str(workdir))
        conformance.Suite.remove_suite_cgroups()


# Pass under runc and zviz's development profile only: runtimetest checks the
# capabilities and noNewPrivileges false of runc's default config, which development
# keeps (ci-runner cuts both, naming the rule). `mounts` also checks that the mounts
# appear in config.json's order, binds included.
UNDER_DEVELOPMENT = ("default", "mounts")


@pytest.fixture(scope="module")
def development_suite(tmp_path_factory):
    if gotools.binary(gotools.RUNTIME_TOOLS, "runtimetest") is None:
        pytest.skip(gotools.missing_reason(gotools.RUNTIME_TOOLS))
    workdir = tmp_path_factory.mktemp(tagged("conformance-development"))
    try:
        yield conformance.Suite(str(workdir), profile="development")
    finally:
        conformance.unmount_below(str(workdir))
        conformance.Suite.remove_suite_cgroups()


@pytest.mark.parametrize("runtime", conformance.RUNTIMES)
@pytest.mark.parametrize("program", REPRESENTATIVE)
def test_program_passes(suite, program, runtime):
    result = suite.run(program, runtime)
    assert result.passed, f"{program} under {runtime}:\n{result.output}\n{result.notes}"


@pytest.mark.parametrize("program", UNDER_DEVELOPMENT)
def test_program_passes_under_development(development_suite, program):
    result = development_suite.run(program, "zviz")
    assert result.passed, f"{program} under development:\n{result.output}\n{result.notes}"


# Programs runc passes that ask for what a user namespace cannot do (every profile runs
# containers in one), and the words zviz's refusal must say.
REFUSED = {
    # A container in the host's namespaces, mount included.
    "linux_ns_itype": ("a mount namespace is required", "under any profile"),
    # Device nodes that exist nowhere on the host: a user namespace may not mknod.
    "linux_devices": ("linux.devices: /dev/test1", "[user_namespace] rule", "mknod"),
    # linux_ns_path (the host's mount, pid and uts namespaces by path; 10 s) and killsig
    # (Landlock's write rule; 9 s) are checked in tests/test_profiles.py instead.
}


@pytest.mark.parametrize("program", sorted(REFUSED))
def test_refusal_names_the_rule(suite, program):
    result = suite.run(program, "zviz")
    assert not result.passed
    for words in REFUSED[program]:
        assert any(words in note for note in result.notes), (words, result.notes)


def test_profile_changes_are_named(suite):
    """`default` checks runc's default capabilities inside: ci-runner keeps none, and the
    runner's notes say so."""
    result = suite.run("default", "zviz")
    assert any(
        note.startswith("profile ci-runner: capabilities beyond profile ci-runner dropped")
        for note in result.notes
    ), result.notes
