"""A Python asyncio HTTP service (stdlib only) in Debian's python3, driven by a client loop
from outside the container (a peer network namespace on a veth: integration/podnet.py).
Profile: web-server (docs/profiles.md: a Python service)."""

from integration.podnet import POD_IP, PodNetwork
from tools.workloads import PYTHON, PYTHON_PORT, PYTHON_PROFILE

REQUESTS = 200

CLIENT = """
import http.client, json, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 30
while True:
    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.connect()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
seen = []
for n in range(count):
    connection.request("GET", f"/item/{n}")
    reply = connection.getresponse()
    doc = json.loads(reply.read())
    assert reply.status == 200 and doc["path"] == f"/item/{n}", (reply.status, doc)
    seen.append(doc["served"])
print(seen[0], seen[-1])
"""


def test_asyncio_service_answers_a_client_loop(workloads, workload_image):
    image = workload_image("python")
    net = PodNetwork(tag="zwl")
    try:
        container_id, started = workloads.run(
            image,
            PYTHON,
            PYTHON_PROFILE,
            netns=net.pod_path,
            detach=True,
        )
        assert started.returncode == 0, started.stderr
        driven = net.in_peer(CLIENT, POD_IP, str(PYTHON_PORT), str(REQUESTS), timeout=90)
        assert driven.returncode == 0, f"{driven.stderr}\nservice:\n{workloads.log(container_id)}"
        # Every request reached the one service process, in order, over one connection.
        assert driven.stdout.split() == ["1", str(REQUESTS)]
        assert "listening" in workloads.log(container_id)
    finally:
        workloads.remove_all()
        net.delete()
