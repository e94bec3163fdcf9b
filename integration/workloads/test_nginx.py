"""nginx, started as root the way Debian's package starts it, serving a static file to a
client outside the container (a peer network namespace on a veth: integration/podnet.py).
Profile: web-server (docs/profiles.md: binds 80, hands its temp dirs to www-data)."""

import os
import shutil
import tempfile
import time

from integration.ids import tagged
from integration.podnet import PEER_IP, POD_IP, PodNetwork
from tools.workloads import NGINX, NGINX_PROFILE, NGINX_SITE

FETCH = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as reply:
            print(reply.status)
            print(reply.read().decode(), end="")
        break
    except OSError as error:
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {sys.argv[1]}: {error}")
        time.sleep(0.2)
"""


def test_nginx_serves_a_static_file_to_the_network(workloads, workload_image):
    image = workload_image("nginx")
    site = tempfile.mkdtemp(prefix=tagged("zviz-wl-site") + "-")
    os.chmod(site, 0o755)
    body = f"served by nginx under {workloads.runtime}\n"
    with open(os.path.join(site, "greeting.txt"), "w") as f:
        f.write(body)
    os.chmod(os.path.join(site, "greeting.txt"), 0o644)
    net = PodNetwork(tag="zwl")
    try:
        container_id, started = workloads.run(
            image,
            NGINX,
            NGINX_PROFILE,
            netns=net.pod_path,
            mounts=(f"type=bind,src={site},dst={NGINX_SITE},options=rbind:ro",),
            detach=True,
        )
        assert started.returncode == 0, started.stderr
        fetched = net.in_peer(FETCH, f"http://{POD_IP}/greeting.txt", "30", timeout=60)
        assert fetched.returncode == 0, (
            f"{fetched.stderr}\nnginx's output:\n{workloads.log(container_id)}"
        )
        assert fetched.stdout == f"200\n{body}"
        # The request reached nginx from outside: its access log names the peer's address.
        # nginx logs a request after answering it, and a loaded runc shim may lose an
        # exec's output (docs/reliability.md): read the log until the line is there.
        deadline = time.monotonic() + 10
        while True:
            access = workloads.exec(container_id, ["cat", "/var/log/nginx/access.log"])
            assert access.returncode == 0, access.stderr
            if f"{PEER_IP} - - " in access.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert f"{PEER_IP} - - " in access.stdout and "GET /greeting.txt" in access.stdout
        # web-server lets a service write its state and logs under /var, not its programs.
        tamper = workloads.exec(container_id, ["sh", "-c", ": > /usr/sbin/planted"])
        assert (tamper.returncode == 0) == (workloads.runtime == "runc"), tamper.stderr
    finally:
        workloads.remove_all()
        net.delete()
        shutil.rmtree(site, ignore_errors=True)
