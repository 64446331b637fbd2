"""Tests of qmagic.remote.auth: client keys bound to identities, enforced with ZAP.

Real CurveZMQ sockets on 127.0.0.1 (free ports), a real ZAP thread, and the real
REManagerAPI client for the README recipe.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import zmq

from qmagic.errors import ControlChannelError, QMagicError, RequestRefused
from qmagic.remote.auth import (
    QUEUESERVER_CLIENT_PUBLIC_KEY,
    ClientIdentity,
    ClientKeys,
    CurveAuthenticator,
    check_claim,
    check_method,
    identity_of,
    secure_server_socket,
)

from polling import eventually

SERVER_PUBLIC, SERVER_SECRET = (k.decode() for k in zmq.curve_keypair())
ALICE = tuple(k.decode() for k in zmq.curve_keypair())  # (public, secret)
ROBOT = tuple(k.decode() for k in zmq.curve_keypair())
ADMIN = tuple(k.decode() for k in zmq.curve_keypair())
STRANGER = tuple(k.decode() for k in zmq.curve_keypair())

CONFIG = {"clients": [
    {"public_key": ALICE[0], "user": "alice", "groups": ["primary"]},
    {"public_key": ROBOT[0], "user": "robot", "groups": ["operators", "primary"]},
    {"public_key": ADMIN[0], "user": None, "groups": ["root"]},
]}
REPLY_WAIT_MS = 3000  # a reply that comes, comes in milliseconds
SILENCE_MS = 500  # how long a refused client is watched for a reply that must not come


class Server:
    """A minimal control server: CURVE + ZAP, answers each request with what it learnt."""

    def __init__(self, keys: ClientKeys | None, *, authenticate: bool = True) -> None:
        self.keys = keys
        self.ctx = zmq.Context()
        self.auth = CurveAuthenticator(self.ctx, keys) if authenticate else None
        if self.auth:
            self.auth.start()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.linger = 0
        secure_server_socket(self.sock, SERVER_SECRET)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.requests: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            frame = self.sock.recv(copy=False)
            request = json.loads(frame.bytes)
            keys = self.auth.keys if self.auth else self.keys
            identity = identity_of(frame, keys)
            self.requests.append((request, identity))
            params = request.get("params", {})
            try:
                check_method(identity, request.get("method", ""))
                user, group = check_claim(identity, params.get("user"), params.get("user_group"))
                reply = {"success": True, "msg": "", "user": user, "user_group": group,
                         "key": identity.public_key}
            except RequestRefused as exc:
                reply = {"success": False, "msg": str(exc)}
            self.sock.send_json(reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close(0)
        if self.auth:
            self.auth.stop()
        self.ctx.term()


@pytest.fixture
def server():
    servers = []

    def start(keys=None, **kw):
        servers.append(Server(keys or ClientKeys.from_config(CONFIG), **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def client():
    ctx = zmq.Context()
    sockets = []

    def connect(address, pair, server_public=SERVER_PUBLIC):
        sock = ctx.socket(zmq.REQ)
        sock.linger = 0
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey, sock.curve_secretkey = pair[0].encode(), pair[1].encode()
        sock.connect(address)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close(0)
    ctx.term()


def ask(sock, params, method="function_execute", wait_ms=REPLY_WAIT_MS):
    sock.send_json({"method": method, "params": params})
    return sock.recv_json() if sock.poll(wait_ms) else None


# ---- identities over real sockets --------------------------------------------------------

def test_known_key_gets_its_identity(server, client):
    srv = server()
    sock = client(srv.address, ALICE)
    assert ask(sock, {}) == {"success": True, "msg": "", "user": "alice", "user_group": "primary",
                             "key": ALICE[0]}  # missing user and group: the key's
    assert ask(sock, {"user": "alice", "user_group": "primary"})["success"]
    robot = client(srv.address, ROBOT)
    assert ask(robot, {"user_group": "operators"})["user"] == "robot"
    assert ask(robot, {})["user_group"] == "operators"  # the first group is the default
    admin = client(srv.address, ADMIN)  # user: null, a front end acting for many users
    assert ask(admin, {"user": "bob", "user_group": "root"})["user"] == "bob"
    assert ask(admin, {})["user"] is None  # no user to fill in: the permission check refuses later
    assert [identity.user for _, identity in srv.requests] == ["alice", "alice", "robot", "robot", None, None]


def test_unknown_key_never_gets_through(server, client):
    srv = server()
    sock = client(srv.address, STRANGER)
    assert ask(sock, {"user": "root", "user_group": "root"}, wait_ms=SILENCE_MS) is None
    eventually(lambda: srv.auth.refused >= 1)
    assert srv.auth.last_refused_key == STRANGER[0]
    assert srv.requests == []  # the request never reached the server
    # the same outcome as a wrong server key: the client only sees a timeout
    wrong = client(srv.address, ALICE, server_public=STRANGER[0])
    assert ask(wrong, {}, wait_ms=SILENCE_MS) is None and srv.requests == []
    # and a listed client on the same server is served meanwhile
    assert ask(client(srv.address, ALICE), {})["user"] == "alice"


def test_the_stock_queueserver_key_is_not_let_in(server, client):
    from bluesky_queueserver.manager import comms

    srv = server()
    stock = (comms._fixed_public_key, comms._fixed_private_key)
    assert stock[0] == QUEUESERVER_CLIENT_PUBLIC_KEY
    assert ask(client(srv.address, stock), {}, wait_ms=SILENCE_MS) is None
    eventually(lambda: srv.auth.last_refused_key == QUEUESERVER_CLIENT_PUBLIC_KEY)


def test_a_key_cannot_claim_another_group_or_user(server, client):
    srv = server()
    robot = client(srv.address, ROBOT)
    reply = ask(robot, {"user": "robot", "user_group": "root"})
    assert reply == {"success": False, "msg": (
        "Error: User group 'root' is not allowed for the client key of user 'robot'; allowed groups: "
        "'operators', 'primary' (REManagerAPI: RM.user_group = 'operators')."
    )}
    reply = ask(robot, {"user": "alice", "user_group": "operators"})
    assert reply["msg"] == ("Error: User name 'alice' does not match the client key, which belongs to "
                            "'robot': send the user name 'robot' or none (REManagerAPI: RM.user = 'robot').")
    reply = ask(robot, {}, method="permissions_set")
    assert reply["msg"] == ("Error: Method 'permissions_set' is allowed only for client keys that may claim "
                            "the user group 'root'; this key may claim 'operators', 'primary'.")
    for method in ("permissions_reload", "config_get"):
        assert not ask(robot, {}, method=method)["success"]
    assert ask(client(srv.address, ADMIN), {"user": "x"}, method="config_get")["success"]


def test_without_an_authenticator_the_secure_socket_admits_nobody(server, client):
    srv = server(authenticate=False)
    assert ask(client(srv.address, ALICE), {}, wait_ms=SILENCE_MS) is None
    assert srv.requests == []


def test_replacing_the_key_list(server, client):
    srv = server()
    alice = client(srv.address, ALICE)
    assert ask(alice, {})["success"]
    srv.auth.keys = ClientKeys.from_config({"clients": [CONFIG["clients"][1]]})  # alice removed
    reply = ask(alice, {})  # the open connection: the next message is refused
    assert reply["msg"] == ("Error: Request refused: this client's key is not in the kernel's list of "
                            "client keys; ask the kernel's administrator to add your public key.")
    refused = srv.auth.refused
    assert ask(client(srv.address, ALICE), {}, wait_ms=SILENCE_MS) is None  # a new connection: refused
    eventually(lambda: srv.auth.refused > refused)
    assert ask(client(srv.address, ROBOT), {})["user"] == "robot"


def test_identity_of_a_frame_without_zap():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://no-zap")
        b.connect("inproc://no-zap")
        b.send(b"x")
        assert a.poll(REPLY_WAIT_MS)
        assert identity_of(a.recv(copy=False), ClientKeys.from_config(CONFIG)) is None
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


# ---- resources ---------------------------------------------------------------------------

def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _term_within(ctx, timeout=10.0) -> bool:
    """ctx.term() returns only when every socket of the context is closed."""
    thread = threading.Thread(target=ctx.term, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def test_stop_releases_thread_and_sockets_over_50_cycles():
    keys = ClientKeys.from_config(CONFIG)
    threads, os_threads, fds = threading.active_count(), _os_threads(), _fds()
    ctx = zmq.Context()
    auth = CurveAuthenticator(ctx, keys)
    for _ in range(50):  # one context, the authenticator started and stopped again and again
        auth.start()
        auth.start()  # no-op when running
        assert auth.is_alive()
        auth.stop()
        auth.stop()  # no-op when stopped
        assert not auth.is_alive()
    assert _term_within(ctx), "a socket of the authenticator was left open"
    client_ctx = zmq.Context()
    for _ in range(50):  # the full life of a server, with an authenticated request each time
        srv = Server(keys)
        sock = client_ctx.socket(zmq.REQ)
        try:
            sock.linger = 0
            sock.curve_serverkey = SERVER_PUBLIC.encode()
            sock.curve_publickey, sock.curve_secretkey = ALICE[0].encode(), ALICE[1].encode()
            sock.connect(srv.address)
            assert ask(sock, {})["success"]
        finally:
            sock.close(0)
            srv.close()
    assert _term_within(client_ctx)
    eventually(lambda: threading.active_count() <= threads)
    eventually(lambda: _os_threads() <= os_threads)
    eventually(lambda: _fds() <= fds, what="the sockets' descriptors to close")


def test_one_zap_handler_per_context():
    ctx = zmq.Context()
    keys = ClientKeys.from_config(CONFIG)
    first = CurveAuthenticator(ctx, keys)
    first.start()
    try:
        with pytest.raises(ControlChannelError, match="another ZAP handler already runs in this zmq context"):
            CurveAuthenticator(ctx, keys).start()
    finally:
        first.stop()
    with CurveAuthenticator(ctx, keys) as again:  # the endpoint was released
        assert again.is_alive()
    assert _term_within(ctx)
    with pytest.raises(ValueError, match="must not be empty"):
        CurveAuthenticator(zmq.Context.instance(), keys, domain="")


# ---- the real client, with the README recipe ---------------------------------------------

def test_rmanagerapi_presents_its_own_key_with_the_readme_recipe(server, monkeypatch):

    from bluesky_queueserver.manager import comms
    from bluesky_queueserver_api.zmq import REManagerAPI

    srv = server()
    stock = REManagerAPI(zmq_control_addr=srv.address, zmq_public_key=SERVER_PUBLIC, timeout_recv=0.5)
    try:
        with pytest.raises(Exception, match="timeout"):  # its built-in key is not in the list
            stock.status()
    finally:
        stock.close()
    # README recipe: before creating the client, replace the key pair it presents
    monkeypatch.setattr(comms, "_fixed_public_key", ALICE[0])
    monkeypatch.setattr(comms, "_fixed_private_key", ALICE[1])
    RM = REManagerAPI(zmq_control_addr=srv.address, zmq_public_key=SERVER_PUBLIC)
    try:
        reply = RM.send_request(method="function_execute", params={"user": "alice", "user_group": "primary"})
        assert reply["user"] == "alice" and reply["key"] == ALICE[0]
        from bluesky_queueserver_api.comm_base import RequestFailedError

        with pytest.raises(RequestFailedError, match="RM.user = 'alice'"):  # its default user name
            RM.send_request(method="function_execute", params={"user": RM.user, "user_group": RM.user_group})
    finally:
        RM.close()


# ---- the key list ------------------------------------------------------------------------

def test_key_list_from_dict_and_file(tmp_path):
    assert ClientKeys.from_config(None) is None and ClientKeys.from_config("") is None
    keys = ClientKeys.from_config(CONFIG)
    assert len(keys) == 3 and keys.groups() == {"primary", "operators", "root"}
    assert keys.lookup(ALICE[0]) == ClientIdentity(ALICE[0], "alice", ("primary",))
    assert keys.lookup(ALICE[0].encode()) == keys.lookup(ALICE[0])
    assert keys.lookup(STRANGER[0]) is None and keys.lookup(None) is None
    path = tmp_path / "client_keys.yaml"
    path.write_text("clients:\n" + "".join(
        f"  - public_key: {json.dumps(e['public_key'])}\n    user: {json.dumps(e['user'])}\n"
        f"    groups: {json.dumps(e['groups'])}\n" for e in CONFIG["clients"]))
    path.chmod(0o600)
    assert list(ClientKeys.from_config(str(path))) == list(keys)
    assert list(ClientKeys.from_config(path)) == list(keys)


@pytest.mark.parametrize("config, message", [
    ([], "Client key list: must be a mapping with the single key 'clients'"),
    ({"clients": [], "x": 1}, "must be a mapping with the single key 'clients'"),
    ({"clients": {}}, "Client key list: clients: must be a list, not dict"),
    ({"clients": ["k"]}, "clients[0]: must be a mapping with public_key, user, groups, not str"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": ["g"], "group": "x"}]},
     "clients[0]: unsupported key 'group'; supported keys: public_key, user, groups"),
    ({"clients": [{"public_key": ALICE[0], "groups": ["g"]}]}, "clients[0]: missing 'user'"),
    ({"clients": [{"public_key": "abc", "user": "a", "groups": ["g"]}]},
     "clients[0].public_key: 'abc' is not a CurveZMQ public key (40 characters of z85 text"),
    ({"clients": [{"public_key": " " * 40, "user": "a", "groups": ["g"]}]},
     "clients[0].public_key: '                                        ' is not valid z85 text"),
    ({"clients": [{"public_key": QUEUESERVER_CLIENT_PUBLIC_KEY, "user": "a", "groups": ["g"]}]},
     "clients[0].public_key: this is the key pair built into bluesky-queueserver's clients"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": ["g"]},
                  {"public_key": ALICE[0], "user": "b", "groups": ["g"]}]},
     "clients[1].public_key: the same key as clients[0]: a key belongs to one client"),
    ({"clients": [{"public_key": ALICE[0], "user": "", "groups": ["g"]}]},
     "clients[0].user: '' must be a user name"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": "primary"}]},
     "clients[0].groups: must be a non-empty list of user group names, not 'primary'"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": []}]}, "clients[0].groups: must be a non-empty"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": ["ok", 3]}]},
     "clients[0].groups[1]: 3 must be a group name"),
    ({"clients": [{"public_key": ALICE[0], "user": "a", "groups": ["x" * 101]}]}, "clients[0].groups[0]:"),
])
def test_key_list_errors(config, message):
    with pytest.raises(ControlChannelError) as info:
        ClientKeys.from_config(config)
    assert message in str(info.value)
    assert isinstance(info.value, (QMagicError, RuntimeError))


def test_key_file_errors(tmp_path):
    with pytest.raises(ControlChannelError, match=r"Client key file '.*nope.yaml' does not exist"):
        ClientKeys.from_config(str(tmp_path / "nope.yaml"))
    open_to_all = tmp_path / "keys.yaml"
    open_to_all.write_text("clients: []\n")
    open_to_all.chmod(0o666)
    with pytest.raises(ControlChannelError, match=r"is writable by other users, who could give themselves any "
                                                  r"group: run  chmod go-w"):
        ClientKeys.from_config(open_to_all)
    open_to_all.chmod(0o644)
    assert len(ClientKeys.from_config(open_to_all)) == 0
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("clients:\n  - public_key: @Yne$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hI\n    user: a\n    groups: [g]\n")
    unquoted.chmod(0o600)
    with pytest.raises(ControlChannelError, match="is not valid YAML \\(quote the keys"):
        ClientKeys.from_config(unquoted)
    with pytest.raises(ControlChannelError, match="it is not a regular file"):
        ClientKeys.from_config(tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo, 0o600)
    start = time.monotonic()
    with pytest.raises(ControlChannelError, match="it is not a regular file"):
        ClientKeys.from_config(fifo)  # refused at once, never waited for
    assert time.monotonic() - start < 5


# ---- the checks on their own -------------------------------------------------------------

def test_check_claim_and_method_without_sockets():
    alice = ClientIdentity(ALICE[0], "alice", ("primary", "operators"))
    assert check_claim(alice, None, None) == ("alice", "primary")
    assert check_claim(alice, "", "") == ("alice", "primary")
    assert check_claim(alice, "alice", "operators") == ("alice", "operators")
    for user, group in [("bob", "primary"), ("alice", "root"), (5, "primary"), ("alice", ["primary"])]:
        with pytest.raises(RequestRefused):
            check_claim(alice, user, group)
    with pytest.raises(RequestRefused) as info:
        check_claim(alice, "x" * 1000, "primary")
    assert len(str(info.value)) < 300  # a long claim is cut in the message
    with pytest.raises(RequestRefused, match="not in the kernel's list of client keys"):
        check_claim(None, "alice", "primary")
    check_method(alice, "function_execute")
    with pytest.raises(RequestRefused, match="'config_get' is allowed only for client keys that may claim"):
        check_method(alice, "config_get")
    check_method(alice, "config_get", root_methods=frozenset())
    with pytest.raises(RequestRefused, match="not in the kernel's list"):
        check_method(None, "status")
