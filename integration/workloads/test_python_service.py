"""A Python asyncio HTTP service (stdlib only) in Debian's python3, driven by a client loop
from outside the container (a peer network namespace on a veth: integration/podnet.py).
Profile: web-server (docs/profiles.md: a Python service)."""

from integration.workloads.http_service import check_service_answers_a_client_loop
from tools.workloads import PYTHON, PYTHON_PORT, PYTHON_PROFILE


def test_asyncio_service_answers_a_client_loop(workloads, workload_image):
    check_service_answers_a_client_loop(
        workloads, workload_image("python"), PYTHON, PYTHON_PROFILE, PYTHON_PORT
    )
