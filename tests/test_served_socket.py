"""The tests' stand-in servers stop without leaving a thread on a closed fd number."""

import socket

from tests.served_socket import ServedSocket


def _udp_echo(sock):
    data, peer = sock.recvfrom(512)
    if data:
        sock.sendto(data, peer)


def _tcp_greet(sock):
    conn, _ = sock.accept()
    with conn:
        conn.sendall(b"hello\n")


def test_a_datagram_server_answers_then_stops_while_waiting():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    served = ServedSocket(server, _udp_echo)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"ping", server.getsockname())
        assert client.recv(16) == b"ping"
    served.close()  # its thread is in recvfrom again: shutdown wakes it
    assert not served._thread.is_alive()
    assert server.fileno() == -1


def test_a_stream_server_answers_then_stops_while_waiting():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    with ServedSocket(server, _tcp_greet) as served:
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            assert client.makefile("rb").readline() == b"hello\n"
    assert not served._thread.is_alive()
    assert server.fileno() == -1
