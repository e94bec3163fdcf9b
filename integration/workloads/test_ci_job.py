"""A CI job: `git clone` of a local bare repository (a read-only volume) into /builds,
`pip install` and `npm install` from a package index and an npm registry that other
containers serve, a gcc/make build and a pytest run of the built program; and
`apt-get install` from an apt repository another container serves. Profile: ci-runner
(docs/profiles.md: build and test jobs; the default); the sources: web-server. Every
package is built here (tools/workloads.ci_package_sources): no registry is reached.

The job and its sources share a network namespace, as a pod's containers do (a CI
service container): the job reaches them on 127.0.0.1, which ci-runner's broker allows
in a pod's namespace."""

import os
import shutil
import tempfile

import pytest

from integration.ids import tagged
from integration.podnet import PodNetwork
from tools.workloads import (
    CI_APT_JOB,
    CI_APT_PROFILE,
    CI_APT_PROFILE_TOML,
    CI_JOB,
    CI_PROFILE,
    CI_REPOSITORY,
    ci_bare_repository,
    ci_package_sources,
    start_ci_package_servers,
)


@pytest.fixture
def package_sources(workloads, workload_image):
    """The network namespace (a pod's) where the three package sources serve."""
    directory = tempfile.mkdtemp(prefix=tagged("zviz-wl-packages") + "-")
    os.chmod(directory, 0o755)
    net = PodNetwork(tag="zwl")
    try:
        trees = ci_package_sources(directory)
        start_ci_package_servers(workloads, workload_image("python"), trees, net.pod_path)
        yield net.pod_path
    finally:
        workloads.remove_all()
        net.delete()
        shutil.rmtree(directory, ignore_errors=True)


def test_ci_job_installs_clones_builds_and_tests(workloads, workload_image, package_sources):
    image = workload_image("ci")
    directory = tempfile.mkdtemp(prefix=tagged("zviz-wl-repo") + "-")
    os.chmod(directory, 0o755)
    try:
        bare = ci_bare_repository(directory)
        _, job = workloads.run(
            image,
            CI_JOB,
            CI_PROFILE,
            netns=package_sources,
            mounts=(f"type=bind,src={bare},dst={CI_REPOSITORY},options=rbind:ro",),
            timeout=300,
        )
        assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
        lines = job.stdout.splitlines()
        assert "PIP!" in lines, job.stdout  # the wheel from the index, imported
        assert "NPM!" in lines, job.stdout  # the npm package from the registry, required
        assert "gcc -O2 -Wall -Werror -o greet greet.c" in lines, job.stdout
        assert "hello, job" in lines, job.stdout  # the artifact the build made, run
        assert any(line.startswith("3 passed") for line in lines), job.stdout
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_ci_job_apt_get_installs_from_a_local_repository(
    workloads, workload_image, package_sources
):
    """Under runc the job installs. Under ci-runner it is refused, by decision: dpkg
    writes the image's /etc, /usr and /var, which ci-runner keeps read-only (Landlock;
    security/test_layers.py pins /etc) so that no build step can replace the toolchain
    or the shell a later step or an operator's exec runs; a job that installs system
    packages runs under an operator profile extending ci-runner (the next test), or
    bakes them into its image (docs/profiles.md)."""
    _, job = workloads.run(
        workload_image("ci"), CI_APT_JOB, CI_PROFILE, netns=package_sources, timeout=300
    )
    if workloads.runtime == "zviz":
        assert job.returncode != 0, job.stdout
        assert "/etc/apt/sources.list: Permission denied" in job.stdout + job.stderr, (
            f"{job.stdout}\n{job.stderr}"
        )
        return
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert job.stdout.splitlines()[-1] == "hello from apt", job.stdout


@pytest.fixture
def operator_profile_config():
    """A shim config whose profile_dirs hold CI_APT_PROFILE. Under /run: profile files
    load only from directories root alone may write (docs/shim.md, "Profiles")."""
    directory = tempfile.mkdtemp(prefix=tagged("zviz-wl-profiles") + "-", dir="/run")
    try:
        with open(os.path.join(directory, f"{CI_APT_PROFILE}.toml"), "w") as f:
            f.write(CI_APT_PROFILE_TOML)
        config = os.path.join(directory, "shim.toml")
        with open(config, "w") as f:
            f.write(
                f'allowed_annotation_profiles = ["{CI_APT_PROFILE}"]\n'
                f'profile_dirs = ["{directory}"]\n'
            )
        yield config
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# A zviz profile: runc ran the same job in the test above.
@pytest.mark.parametrize("runtime", ["zviz"])
def test_ci_job_apt_get_installs_under_a_profile_that_lets_dpkg_write(
    workloads, workload_image, package_sources, operator_profile_config
):
    # What docs/profiles.md tells a job that installs system packages to use: ci-runner
    # with /etc, /usr and /var of its own rootfs writable.
    _, job = workloads.run(
        workload_image("ci"),
        CI_APT_JOB,
        CI_APT_PROFILE,
        netns=package_sources,
        shim_config=operator_profile_config,
        timeout=300,
    )
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert job.stdout.splitlines()[-1] == "hello from apt", job.stdout
