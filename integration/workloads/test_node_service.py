"""A Node.js HTTP service (its core `http` module) in Debian's nodejs, driven by a client
loop from outside the container (a peer network namespace on a veth: integration/podnet.py).
Profile: web-server (docs/profiles.md: a Node.js service)."""

from integration.workloads.http_service import check_service_answers_a_client_loop
from tools.workloads import NODE, NODE_PORT, NODE_PROFILE


def test_node_service_answers_a_client_loop(workloads, workload_image):
    check_service_answers_a_client_loop(
        workloads, workload_image("node"), NODE, NODE_PROFILE, NODE_PORT
    )
