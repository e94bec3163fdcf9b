"""An HTTP service in a container driven by a client loop from outside it: the Python and
Node.js services' shared check. The client runs in a peer network namespace on a veth
(integration/podnet.py), a host reaching the container's published port."""

from integration.podnet import POD_IP, PodNetwork

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


def check_service_answers_a_client_loop(workloads, image: str, args, profile: str, port: int):
    """Start the service (ARGS in IMAGE under PROFILE, answering JSON {"path", "served"}
    on PORT and printing "listening"), then drive REQUESTS requests over one keep-alive
    connection from the peer namespace."""
    net = PodNetwork(tag="zwl")
    try:
        container_id, started = workloads.run(image, args, profile, netns=net.pod_path, detach=True)
        assert started.returncode == 0, started.stderr
        driven = net.in_peer(CLIENT, POD_IP, str(port), str(REQUESTS), timeout=90)
        assert driven.returncode == 0, f"{driven.stderr}\nservice:\n{workloads.log(container_id)}"
        # Every request reached the one service process, in order, over one connection.
        assert driven.stdout.split() == ["1", str(REQUESTS)]
        assert "listening" in workloads.log(container_id)
    finally:
        workloads.remove_all()
        net.delete()
