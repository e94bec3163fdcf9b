"""A CI job: `git clone` of a local bare repository (a read-only volume), a gcc/make build
and a pytest run of the built program. Profile: ci-runner (docs/profiles.md: build and
test jobs; the default)."""

import os
import shutil
import tempfile

from integration.ids import tagged
from tools.workloads import CI_JOB, CI_PROFILE, CI_REPOSITORY, ci_bare_repository


def test_ci_job_clones_builds_and_tests(workloads, workload_image):
    image = workload_image("ci")
    directory = tempfile.mkdtemp(prefix=tagged("zviz-wl-repo") + "-")
    os.chmod(directory, 0o755)
    try:
        bare = ci_bare_repository(directory)
        _, job = workloads.run(
            image,
            CI_JOB,
            CI_PROFILE,
            mounts=(f"type=bind,src={bare},dst={CI_REPOSITORY},options=rbind:ro",),
            timeout=300,
        )
        assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
        lines = job.stdout.splitlines()
        assert "gcc -O2 -Wall -Werror -o greet greet.c" in lines, job.stdout
        assert "hello, job" in lines, job.stdout  # the artifact the build made, run
        assert any(line.startswith("3 passed") for line in lines), job.stdout
    finally:
        shutil.rmtree(directory, ignore_errors=True)
