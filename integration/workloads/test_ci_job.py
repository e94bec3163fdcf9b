"""A CI job: `git clone` of a local bare repository (a read-only volume), a gcc/make build
and a pytest run of the built program. Profile: ci-runner (docs/profiles.md: build and
test jobs; the default)."""

import os
import shutil
import subprocess
import tempfile

from integration.ids import tagged

PROFILE = "ci-runner"

SOURCES = {
    "greet.c": """#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    printf("hello, %s\\n", argc > 1 ? argv[1] : "world");
    return argc > 2 ? (int)strlen(argv[2]) : 0;
}
""",
    "Makefile": "greet: greet.c\n\tgcc -O2 -Wall -Werror -o greet greet.c\n",
    "test_greet.py": """import subprocess

def run(*args):
    return subprocess.run(["./greet", *args], capture_output=True, text=True)

def test_greets_the_world():
    assert run().stdout == "hello, world\\n"

def test_greets_by_name():
    assert run("ci").stdout == "hello, ci\\n"

def test_exit_status_is_the_second_arguments_length():
    assert run("ci", "abcd").returncode == 4
""",
}

# In root's home: a directory of the image that ci-runner lets a job write (Landlock).
JOB = """
set -e
git clone -q /srv/repo.git /root/greet
cd /root/greet
make
./greet job
python3 -m pytest -q -p no:cacheprovider
"""


def _bare_repository(directory: str) -> str:
    work = os.path.join(directory, "work")
    os.mkdir(work)
    for name, text in SOURCES.items():
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    git = ["git", "-c", "user.name=zviz", "-c", "user.email=zviz@localhost", "-C", work]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "greet"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    bare = os.path.join(directory, "repo.git")
    subprocess.run(["git", "clone", "-q", "--bare", work, bare], check=True, capture_output=True)
    return bare


def test_ci_job_clones_builds_and_tests(workloads, workload_image):
    image = workload_image("ci")
    directory = tempfile.mkdtemp(prefix=tagged("zviz-wl-repo") + "-")
    os.chmod(directory, 0o755)
    try:
        bare = _bare_repository(directory)
        _, job = workloads.run(
            image,
            ["sh", "-c", JOB],
            PROFILE,
            mounts=(f"type=bind,src={bare},dst=/srv/repo.git,options=rbind:ro",),
            timeout=300,
        )
        assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
        lines = job.stdout.splitlines()
        assert "gcc -O2 -Wall -Werror -o greet greet.c" in lines, job.stdout
        assert "hello, job" in lines, job.stdout  # the artifact the build made, run
        assert any(line.startswith("3 passed") for line in lines), job.stdout
    finally:
        shutil.rmtree(directory, ignore_errors=True)
