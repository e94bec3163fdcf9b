"""A pod's network for the tests: a named network namespace (the pod sandbox's) wired by a
veth pair to a second one (a host outside the pod), with a bundle helper that joins it.

    pod netns  zn11-pod-XXXX   lo up, POD_IP/24 and POD_IP6/64 on the pod end of the veth
    peer netns zn11-peer-XXXX  lo up, PEER_IP/24 and PEER_IP6/64 on the other end

Only namespaces and links the tests create; `delete()` removes both namespaces (and the
veth with them).
"""

import json
import os
import subprocess
import sys
import uuid

from tools.netns import NETNS_DIR, entering

POD_IP = "10.211.7.1"
PEER_IP = "10.211.7.2"
POD_IP6 = "fd11:211::1"
PEER_IP6 = "fd11:211::2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class PodNetwork:
    def __init__(self, tag: str = "zn11"):
        suffix = uuid.uuid4().hex[:6]
        self.pod = f"{tag}-pod-{suffix}"
        self.peer = f"{tag}-peer-{suffix}"
        self.pod_path = os.path.join(NETNS_DIR, self.pod)
        self.peer_path = os.path.join(NETNS_DIR, self.peer)
        made = []
        try:
            for name in (self.pod, self.peer):
                _ip("netns", "add", name)
                made.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            pod_end, peer_end = f"{tag}p{suffix}", f"{tag}q{suffix}"  # <= 15 bytes
            _ip("link", "add", pod_end, "type", "veth", "peer", "name", peer_end)
            _ip("link", "set", pod_end, "netns", self.pod)
            _ip("link", "set", peer_end, "netns", self.peer)
            for name, end, address, address6 in (
                (self.pod, pod_end, POD_IP, POD_IP6),
                (self.peer, peer_end, PEER_IP, PEER_IP6),
            ):
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", end)
                # nodad: usable at once, not after duplicate address detection.
                _ip("-n", name, "addr", "add", f"{address6}/64", "dev", end, "nodad")
                _ip("-n", name, "link", "set", end, "up")
        except BaseException:
            for name in made:
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            raise

    def delete(self) -> None:
        for name in (self.pod, self.peer):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)

    def join(self, bundle: str) -> str:
        """Make the bundle's config.json join the pod's network namespace by path."""
        path = os.path.join(bundle, "config.json")
        with open(path) as f:
            config = json.load(f)
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = self.pod_path
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
        return bundle

    def in_peer(self, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Python CODE run in the peer namespace (a host outside the pod)."""
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            preexec_fn=entering(self.peer_path),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def peer_popen(self, code: str, *args: str) -> subprocess.Popen:
        """Python CODE started in the peer namespace; the caller kills it."""
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            preexec_fn=entering(self.peer_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


# Host-side snippets for in_peer/in_pod.
SEND = """
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
            s.sendall(sys.argv[3].encode())
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""
# A TCP listener that greets and a UDP socket that prints what it receives, until killed.
LISTEN = """
import socket, sys, threading
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((sys.argv[1], int(sys.argv[2])))
tcp.listen(8)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((sys.argv[1], int(sys.argv[2])))
def datagrams():
    while True:
        data = udp.recv(100)
        print("udp", data.decode(errors="replace"), flush=True)
threading.Thread(target=datagrams, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    conn.sendall(b"zn11-outside\\n")
    conn.close()
"""
