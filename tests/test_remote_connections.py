"""The bound on the control channel's open connections (qmagic.remote.connections): each
connection may hold a few requests in memory, and nothing bounded how many a client opened
(100 clients x 3 x 9 MB took 1.6 GB; at the 64 MB cap ~1,000 connections end the kernel).
The channel's ZAP handler now refuses a connection while ``QMagic.zmq_max_connections`` are
open.  Real sockets on 127.0.0.1: plain, CurveZMQ, CurveZMQ with a client key list."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import pytest
import zmq

from qmagic.remote import server as server_module
from qmagic.remote.auth import ClientKeys
from qmagic.remote import connections
from qmagic.remote.connections import ConnectionLimit
from qmagic.remote.server import ControlServer
from qmagic.remote.service import RemoteService

from child_process import end_child, memory_kb
from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture
from polling import eventually

pytestmark = pytest.mark.timeout(120)

SERVER_PUBLIC, SERVER_SECRET = (k.decode() for k in zmq.curve_keypair())
PAIRS = [tuple(k.decode() for k in zmq.curve_keypair()) for _ in range(8)]
STRANGER = tuple(k.decode() for k in zmq.curve_keypair())
KEYS = {"clients": [{"public_key": pub, "user": f"user{i}", "groups": ["primary"]}
                    for i, (pub, _) in enumerate(PAIRS)]}
REPLY_WAIT_MS = 5000  # a reply that comes, comes in milliseconds
SILENCE_MS = 300  # how long a refused client is watched for a reply that must not come


@pytest.fixture(autouse=True)
def patience(monkeypatch):
    """A connection at the limit waits less for the count to fall before it is refused (2 s
    in use): the refusals here come sooner."""
    monkeypatch.setattr(connections, "PATIENCE_S", 0.5)


def echo(request, **who):
    return {"success": True, "msg": "", "method": request.get("method")}


class Clients:
    """REQ clients of one server (in the server's mode), closed at the end."""

    def __init__(self, address: str, mode: str) -> None:
        self.address, self.mode = address, mode
        self.ctx = zmq.Context()
        self.made = 0

    def connect(self, pair=None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.linger = 0
        if self.mode != "plain":
            pair = pair or PAIRS[self.made % len(PAIRS)]
            sock.curve_serverkey = SERVER_PUBLIC.encode()
            sock.curve_publickey, sock.curve_secretkey = pair[0].encode(), pair[1].encode()
        self.made += 1
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        self.ctx.destroy(0)


def served(sock) -> bool:
    """Whether a status request on ``sock`` gets its reply."""
    sock.send_json({"method": "status"})
    return sock.poll(REPLY_WAIT_MS) and bool(sock.recv_json())


def refused(sock) -> bool:
    """Whether a request on ``sock`` (whose connection was refused) gets no reply."""
    try:
        sock.send_json({"method": "status"}, zmq.NOBLOCK)
    except zmq.Again:  # (no connection left to queue it for)
        return True
    return not sock.poll(SILENCE_MS)


@pytest.fixture(params=["plain", "curve", "curve+keys"])
def channel(request):
    mode = request.param
    servers, clients = [], []

    def start(limit: int):
        keys = ClientKeys.from_config(KEYS) if mode == "curve+keys" else None
        srv = ControlServer(echo, "tcp://127.0.0.1:*", max_connections=limit,
                            secret_key=None if mode == "plain" else SERVER_SECRET, client_keys=keys).start()
        servers.append(srv)
        clients.append(Clients(srv.address, mode))
        return srv, clients[-1]

    yield start
    for c in clients:
        c.close()
    for s in servers:
        s.stop()


def test_a_connection_beyond_the_limit_is_refused_until_one_closes(channel, caplog):
    srv, clients = channel(3)
    first = [clients.connect() for _ in range(3)]
    assert all(served(sock) for sock in first)
    assert srv.connections.held == 3 and srv.connections.refused == 0
    with caplog.at_level(logging.WARNING, logger="qmagic"):
        fourth = clients.connect()
        eventually(lambda: srv.connections.refused == 1, what="the fourth connection refused")
        assert refused(fourth)
        assert all(served(sock) for sock in first)  # the first three are served on
        fifth = clients.connect()
        eventually(lambda: srv.connections.refused == 2, what="the fifth connection refused")
    warnings = [r.getMessage() for r in caplog.records if "zmq_max_connections" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once
    assert "refused a connection: 3 are open" in warnings[0] and "\n" not in warnings[0]
    assert "raise QMagic.zmq_max_connections or find the program opening them" in warnings[0]

    first[0].close(0)  # a place frees
    eventually(lambda: srv.connections.held == 2, what="the closed connection counted out")
    again = clients.connect()
    assert served(again)
    assert srv.connections.held == 3
    assert all(served(sock) for sock in first[1:])


def test_the_connection_check_sleeps_while_nothing_happens(channel, monkeypatch):
    """The ZAP thread's waker stayed readable once woken (0MQ's poller names a descriptor
    by its number, and the thread looked for the object): it polled ~78,000 times a second,
    a whole CPU, from the channel's start.  Counted: a few polls for a few round trips."""
    from qmagic.remote import zap

    polls = [0]

    class Counted(zmq.Poller):
        def poll(self, timeout=None):
            polls[0] += 1
            return super().poll(timeout)

    monkeypatch.setattr(zap.zmq, "Poller", Counted)
    srv, clients = channel(4)
    sock = clients.connect()
    for _ in range(4):
        assert served(sock)
    assert polls[0] <= 20, polls[0]  # (927 before: spinning)


def test_unknown_keys_take_no_place():
    keys = ClientKeys.from_config(KEYS)
    srv = ControlServer(echo, "tcp://127.0.0.1:*", max_connections=1, secret_key=SERVER_SECRET,
                        client_keys=keys).start()
    clients = Clients(srv.address, "curve+keys")
    try:
        strangers = [clients.connect(STRANGER) for _ in range(3)]
        eventually(lambda: srv._auth.refused >= 3, what="the unknown keys refused")
        assert srv.connections.refused == 0  # (refused for their key, not for the limit)
        listed = clients.connect()
        assert served(listed) and srv.connections.held == 1
    finally:
        clients.close()
        srv.stop()


def _raw(address: str) -> socket.socket:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def _null_handshake(sock: socket.socket) -> None:
    """A ZMTP 3.0 client's greeting and READY (NULL mechanism) by hand: a client that
    completes the handshake, then never answers anything."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    name, value = b"Socket-Type", b"REQ"
    body = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
    sock.sendall(greeting + bytes([0x04, len(body)]) + body)


def test_churn_is_counted_right(channel):
    """Connections opening and closing fast, raw ones that never complete a handshake, send
    garbage or an old protocol: once they are gone, nothing is counted open."""
    srv, clients = channel(3)
    silent = [_raw(srv.address) for _ in range(5)]  # never complete a handshake
    kept = [clients.connect() for _ in range(3)]
    assert all(served(sock) for sock in kept)  # the silent ones take no place
    for sock in kept:
        sock.close(0)
    for sock in silent:
        sock.close()
    failing = []
    for _ in range(20):
        sock = clients.connect()
        assert served(sock)
        sock.close(0)
        raw = _raw(srv.address)
        raw.sendall(b"\x01\x00garbage" * 10)
        raw.close()
        raw = _raw(srv.address)
        raw.sendall(b"\xff" + bytes(8) + b"\x7f\x01\x03")  # ZMTP 2.0
        raw.close()
        if clients.mode != "plain":  # a handshake that fails: the wrong server key
            wrong = clients.ctx.socket(zmq.REQ)
            wrong.linger = 0
            wrong.curve_serverkey = PAIRS[0][0].encode()
            wrong.curve_publickey, wrong.curve_secretkey = PAIRS[1][0].encode(), PAIRS[1][1].encode()
            wrong.connect(srv.address)
            failing.append(wrong)
    for sock in failing:
        sock.close(0)
    eventually(lambda: srv.connections.held == 0, what="every connection counted out")
    again = [clients.connect() for _ in range(3)]
    assert all(served(sock) for sock in again)
    late = clients.connect()
    eventually(lambda: srv.connections.refused == 1, what="the fourth connection refused")


def test_a_client_gone_silent_loses_its_place_to_heartbeats(monkeypatch):
    """A client that completed its handshake and then answers nothing (its machine gone, a
    cut network: no FIN ever comes) is closed by 0MQ heartbeats, freeing its place."""
    monkeypatch.setattr(server_module, "HEARTBEAT_IVL_MS", 100)
    monkeypatch.setattr(server_module, "HEARTBEAT_TIMEOUT_MS", 300)
    srv = ControlServer(echo, "tcp://127.0.0.1:*", max_connections=1).start()
    clients = Clients(srv.address, "plain")
    dead = _raw(srv.address)
    try:
        _null_handshake(dead)
        eventually(lambda: srv.connections.held == 1, what="the hand-made client admitted")
        eventually(lambda: srv.connections.held == 0, what="the silent client closed by heartbeats")
        assert served(clients.connect())
    finally:
        dead.close()
        clients.close()
        srv.stop()


def test_the_setting_and_the_channel_status(make_worker):
    worker = make_worker({}, zmq_max_connections=2, zmq_control_address="tcp://127.0.0.1:*")
    service = RemoteService(worker)
    clients = []
    try:
        server = service.server
        assert server.max_connections == 2
        first = Clients(server.address, "plain")
        clients.append(first)
        socks = [first.connect() for _ in range(2)]
        assert served(socks[0]) and served(socks[1])
        socks.append(first.connect())
        eventually(lambda: server.connections.refused == 1)
        text = service.describe()
        assert "2 connections open, at most 2 (QMagic.zmq_max_connections); 1 attempt to connect " \
               "refused at the limit" in text, text
        worker.zmq_max_connections = 3  # applies to the next connection
        third = first.connect()
        assert served(third)
        # a new address: a new socket, counted afresh (the old connections closed with it)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        worker.zmq_control_address = f"tcp://127.0.0.1:{port}"
        moved = service.server
        assert moved is not server and moved.max_connections == 3
        second = Clients(moved.address, "plain")
        clients.append(second)
        kept = [second.connect() for _ in range(3)]
        assert all(served(sock) for sock in kept)
        assert moved.connections.held == 3
        assert "3 connections open, at most 3" in service.describe()
    finally:
        for c in clients:
            c.close()
        service.close()


def test_the_count_is_an_upper_bound_exact_for_settled_connections():
    """Without sockets: what the count says while connections open, are admitted, close
    and age, and when a decision waits."""
    now = [1000.0]
    limit = ConnectionLimit(2, handshake_s=10.0, clock=lambda: now[0])
    accepted, disconnected = zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED
    limit.event(accepted, 7)
    assert limit.admit() is True  # (the connection being decided is not counted)
    limit.event(accepted, 8)
    assert limit.admit() is True and limit.held == 2
    limit.event(accepted, 9)
    assert limit.admit() is None  # at the limit with young ones: it waits...
    assert limit.admit(waited=connections.PATIENCE_S) is False and limit.refused == 1  # ... then is refused
    limit.event(disconnected, 9)
    limit.event(accepted, 10)  # silent: never asks
    limit.event(disconnected, 7)
    assert limit.held == 2  # 8 or 10 may be the admitted one: both counted while young
    limit.event(accepted, 11)
    assert limit.admit() is None
    limit.event(disconnected, 10)  # the silent one gone: the waiting one gets its place
    assert limit.admit() is True
    now[0] += 12.5  # older than the handshake timeout: 8 and 11 finished their handshakes
    assert limit.held == 2
    limit.event(accepted, 12)
    assert limit.admit() is False and limit.refused == 2  # the old ones fill it: no wait
    limit.event(disconnected, 12)
    limit.event(disconnected, 8)
    limit.event(accepted, 13)
    assert limit.held == 1 and limit.admit() is True
    limit.limit = 1
    limit.event(accepted, 14)
    assert limit.admit(waited=connections.PATIENCE_S) is False
    assert limit.describe() == ("  2 connections open, at most 1 (QMagic.zmq_max_connections); "
                                "3 attempts to connect refused at the limit")
    limit.reset()
    assert limit.held == 0


SERVER = r"""
import sys
from traitlets.config import Config
from qmagic import Worker
from qmagic.remote.service import RemoteService

config = Config()
config.QMagic.state_dir = sys.argv[1]
config.QMagic.journal_enabled = False
config.QMagic.zmq_max_connections = 4
config.QMagic.zmq_control_address = "tcp://127.0.0.1:*"
worker = Worker({}, config=config)
service = RemoteService(worker)
server = service.server
print(server.address, flush=True)
for line in sys.stdin:
    connections = getattr(server, "connections", None)
    print(server.requests, getattr(connections, "refused", 0), flush=True)
service.close()
worker.close()
"""


def test_many_connections_sending_large_requests_keep_the_kernel_bounded(tmp_path):
    """40 clients each send three 9 MB requests at once: the kernel held them all (its peak
    memory grew ~470 MB here; 1.6 GB for 100 clients).  Now 4 connections are served and the other 36
    refused: the peak stays near 4 x 3 requests.  (Counted: the test waits until every
    client was served or refused, then reads the kernel's peak memory from /proc.)"""
    child = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    try:
        address = child.stdout.readline().strip()

        def progress() -> tuple[int, int]:
            child.stdin.write("?\n")
            child.stdin.flush()
            requests, refused = map(int, child.stdout.readline().split())
            return requests, refused

        before = memory_kb(child.pid, "VmRSS")
        body = json.dumps({"method": "status", "params": {"pad": "x" * (9 * 1_000_000)}}).encode()
        clients, per_client = 40, 3
        socks = []
        for _ in range(clients):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(address)
            socks.append(sock)
        for sock in socks:
            for _ in range(per_client):
                sock.send_multipart([b"", body], copy=False)

        def settled() -> bool:
            requests, refused = progress()
            return requests >= per_client * (clients - refused)

        eventually(settled, timeout=4 * TIMEOUT, what="every client served or refused", interval=0.05)
        requests, refused = progress()
        grown_mb = (memory_kb(child.pid, "VmHWM") - before) / 1024
        print(f"\n{clients} clients x {per_client} x 9 MB: {refused} refused, {requests} requests "
              f"served, the kernel's peak memory grew {grown_mb:.0f} MB")
        assert grown_mb < 250, grown_mb  # (4 x 3 x 9 MB and their decoding; before: ~470 MB)
        assert refused == clients - 4, (requests, refused)
    finally:
        ctx.destroy(0)
        end_child(child, TIMEOUT)
