"""The control channel with CurveZMQ client keys: only listed clients get through, and each
may claim only its own user and groups — end to end, with queueserver's real client (its
asyncio REManagerAPI through remote_client.LoopClient: that file says why)."""

from __future__ import annotations

import time

import pytest
import zmq
from bluesky_queueserver.manager import comms
from bluesky_queueserver_api import BFunc
from bluesky_queueserver_api.comm_base import RequestFailedError

from qmagic.remote.service import RemoteService

from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture
from remote_client import LoopClient

SERVER_PUBLIC, SERVER_SECRET = (k.decode() for k in zmq.curve_keypair())
ALICE = tuple(k.decode() for k in zmq.curve_keypair())
ROBOT = tuple(k.decode() for k in zmq.curve_keypair())


@pytest.fixture(autouse=True)
def _status_period(monkeypatch):
    """Info sockets send the status every 0.25 s, not every second: a subscriber that gets in
    receives one within a period, so "nothing in 2.5 periods" (a stranger shut out) takes
    0.6 s, not 2.5 s, and means the same."""
    import qmagic.remote.info

    monkeypatch.setattr(qmagic.remote.info, "STATUS_PERIOD_S", 0.25)


@pytest.fixture
def channel(make_worker, monkeypatch):
    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    keys = {"clients": [
        {"public_key": ALICE[0], "user": "alice", "groups": ["root", "primary"]},
        {"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]},
    ]}
    worker = make_worker({"add": lambda a, b: a + b}, zmq_client_keys=keys)
    service = RemoteService(worker)
    service.start("tcp://127.0.0.1:*")
    yield worker, service.server.address
    service.close()


def _client(address, pair, monkeypatch, **kwargs):
    monkeypatch.setattr(comms, "_fixed_public_key", pair[0])
    monkeypatch.setattr(comms, "_fixed_private_key", pair[1])
    return LoopClient(zmq_control_addr=address, zmq_public_key=SERVER_PUBLIC, **kwargs)


def test_listed_clients_act_as_themselves(channel, monkeypatch):
    worker, address = channel
    RM = _client(address, ROBOT, monkeypatch)
    try:
        RM.user, RM.user_group = "robot", "primary"
        reply = RM.function_execute(BFunc("add", 2, 3), run_in_background=True)
        task = worker.get_task(reply["task_uid"])
        assert task.result(TIMEOUT) == 5 and task.user == "robot"
        RM.user_group = "root"
        with pytest.raises(RequestFailedError, match="User group 'root' is not allowed for the client key of user 'robot'"):
            RM.function_execute(BFunc("add", 2, 3), run_in_background=True)
        RM.user, RM.user_group = "alice", "primary"
        with pytest.raises(RequestFailedError, match="does not match the client key"):
            RM.function_execute(BFunc("add", 2, 3), run_in_background=True)
        with pytest.raises(RequestFailedError, match="allowed only for client keys that may claim the user group 'root'"):
            RM.permissions_reload()
    finally:
        RM.close()
    admin = _client(address, ALICE, monkeypatch)
    try:
        admin.user, admin.user_group = "alice", "root"
        assert admin.permissions_reload()["success"]
        assert admin.function_execute(BFunc("add", 1, 1), run_in_background=True)["success"]
    finally:
        admin.close()


def test_unlisted_and_stock_keys_get_no_answer(channel, monkeypatch):
    worker, address = channel
    stranger = tuple(k.decode() for k in zmq.curve_keypair())
    for pair in (stranger, (comms._fixed_public_key, comms._fixed_private_key)):
        RM = _client(address, pair, monkeypatch, timeout_recv=0.3)
        try:
            with pytest.raises(Exception, match="(?i)timeout"):
                RM.status()
        finally:
            RM.close()
    assert worker.tasks() == []


def test_client_keys_without_curve_refuse_to_start(make_worker, monkeypatch):
    from qmagic import ControlChannelError

    monkeypatch.delenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", raising=False)
    worker = make_worker({}, zmq_client_keys={"clients": [
        {"public_key": ALICE[0], "user": "alice", "groups": ["primary"]}]})
    service = RemoteService(worker)
    try:
        with pytest.raises(ControlChannelError, match="needs CurveZMQ"):
            service.start("tcp://127.0.0.1:*")
        assert worker.zmq_control_address is None
    finally:
        service.close()


def test_the_info_socket_admits_only_listed_clients(make_worker, monkeypatch):
    """With client keys, the live streams are as private as the control channel: a listed
    key receives the status, a stranger's subscription gets nothing (the handshake fails)."""
    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    keys = {"clients": [{"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]}]}
    worker = make_worker({}, zmq_client_keys=keys)
    service = RemoteService(worker)
    publisher = service.start_info("tcp://127.0.0.1:*")
    ctx = zmq.Context()
    subs = []
    try:
        for public, secret in (ROBOT, tuple(k.decode() for k in zmq.curve_keypair())):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = (
                SERVER_PUBLIC.encode(), public.encode(), secret.encode())
            sub.setsockopt(zmq.SUBSCRIBE, b"QS_Info")
            sub.connect(publisher.address)
            subs.append(sub)
        listed, stranger = subs
        assert listed.poll(10_000), "the listed client received no status within 10 s"
        assert listed.recv_multipart()[0] == b"QS_Info"
        # the status goes out about once a period: 2.5 periods without a message for the stranger
        assert not stranger.poll(int(2.5 * 1000 * publisher.status_period))
    finally:
        for sub in subs:
            sub.close(0)
        ctx.term()
        service.close()


def test_an_unencrypted_info_socket_beside_an_encrypted_channel_serves_queueservers_subscribers(
        make_worker, monkeypatch):
    """QMagic.zmq_info_encrypted = False: queueserver's own console monitor (no keys) receives
    what tasks print while the control channel stays encrypted and keyed; turned on again,
    the socket is made again encrypted and a plain subscriber receives nothing."""
    from bluesky_queueserver_api.zmq import REManagerAPI

    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    keys = {"clients": [{"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]}]}
    worker = make_worker({"say": lambda text: print(text)}, zmq_client_keys=keys,
                         zmq_info_encrypted=False)
    service = RemoteService(worker)
    service.start("tcp://127.0.0.1:*")
    service.start_info("tcp://127.0.0.1:*")
    rm = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:1", zmq_info_addr=service.info.address,
                      console_monitor_poll_timeout=0.05)
    ctx = zmq.Context()
    plain = ctx.socket(zmq.SUB)
    plain.setsockopt(zmq.LINGER, 0)
    try:
        assert "(not encrypted: QMagic.zmq_info_encrypted is False)" in service.info.describe()[0]
        rm.console_monitor.enable()
        deadline, seen = time.monotonic() + TIMEOUT, ""
        while "beamline" not in seen and time.monotonic() < deadline:  # (PUB drops what is sent
            worker.submit("say", ("beamline",)).wait(TIMEOUT)  # before the subscription arrives)
            try:
                seen += rm.console_monitor.next_msg(timeout=0.2)["msg"]
            except TimeoutError:
                pass
        assert "beamline" in seen, "queueserver's console monitor received nothing"
        stranger = _client(service.server.address, tuple(k.decode() for k in zmq.curve_keypair()),
                           monkeypatch, timeout_recv=0.3)
        try:  # (the channel still admits only listed keys)
            with pytest.raises(Exception, match="(?i)timeout"):
                stranger.status()
        finally:
            stranger.close()

        address = service.info.address
        worker.zmq_info_encrypted = True  # made again at its address, encrypted
        assert service.info.running and service.info.address == address and service.info.curve
        assert "not encrypted" not in "\n".join(service.info.describe())
        plain.setsockopt(zmq.SUBSCRIBE, b"QS_Info")
        plain.connect(address)
        assert not plain.poll(int(2.5 * 1000 * service.info.status_period))
    finally:
        plain.close(0)
        ctx.term()
        rm.console_monitor.disable_wait(timeout=2)
        rm.close()
        service.close()


def test_a_script_runs_as_its_clients_user(channel, monkeypatch):
    worker, address = channel
    RM = _client(address, ROBOT, monkeypatch)
    try:
        uid = RM.script_upload("uploaded = True\n")["task_uid"]
    finally:
        RM.close()
    task = worker.get_task(uid)
    assert task.wait(TIMEOUT) and task.status.value == "completed"
    assert (task.user, task.user_group) == ("robot", "primary")


def test_a_key_taken_out_of_the_list_is_refused_at_once(channel, monkeypatch):
    """Changing QMagic.zmq_client_keys on a live kernel applies at once: a revoked key gets
    no answer from its next request on; a list that cannot be read is refused with a clear
    error and changes nothing; turning the list off starts the channel again without it."""
    from qmagic import ControlChannelError

    worker, address = channel
    RM = _client(address, ROBOT, monkeypatch, timeout_recv=0.5)
    try:
        RM.user, RM.user_group = "robot", "primary"
        assert RM.status()["manager_state"] == "idle"
        old = worker.zmq_client_keys
        with pytest.raises(ControlChannelError, match="public_key"):
            worker.zmq_client_keys = {"clients": [{"user": "robot", "groups": ["primary"]}]}
        assert worker.zmq_client_keys == old  # refused: the setting and the channel as they were
        assert RM.status()["manager_state"] == "idle"
        worker.zmq_client_keys = {"clients": [
            {"public_key": ALICE[0], "user": "alice", "groups": ["root", "primary"]}]}  # robot out
        with pytest.raises(RequestFailedError, match="not in the kernel's list of client keys"):
            RM.function_execute(BFunc("add", 2, 3), run_in_background=True)  # open connection
    finally:
        RM.close()
    admin = _client(address, ALICE, monkeypatch)
    try:
        assert admin.status()["manager_state"] == "idle"  # the listed key still gets through
    finally:
        admin.close()
    worker.zmq_client_keys = None  # no list: user and group are claims again
    assert worker.zmq_control_address == address  # same address, started again
    RM = _client(address, ROBOT, monkeypatch)
    try:
        RM.user, RM.user_group = "anyone", "primary"
        assert RM.function_execute(BFunc("add", 1, 2), run_in_background=True)["success"]
    finally:
        RM.close()


def _shut_out(stranger, address: str, period: float) -> bool:
    """True when ``stranger`` (a SUB socket with keys of its own, not in the list) gets no
    status from the info socket at ``address``: the status goes out about once a ``period``,
    so two periods without a message."""
    public, secret = (k.decode() for k in zmq.curve_keypair())
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.curve_serverkey, stranger.curve_publickey, stranger.curve_secretkey = (
        SERVER_PUBLIC.encode(), public.encode(), secret.encode())
    stranger.setsockopt(zmq.SUBSCRIBE, b"QS_Info")
    stranger.connect(address)
    return not stranger.poll(int(2.5 * 1000 * period))


def test_a_channel_that_cannot_start_again_for_a_key_list_still_closes_the_info_socket(make_worker, monkeypatch):
    """A key list turned on starts the channel and the info socket again.  When the channel
    could not start again (its port taken meanwhile), the info socket was not restarted
    either: its streams stayed open to any client while the setting said listed clients
    only.  The info socket now restarts with the list, and the channel's error is raised."""
    import inspect
    import sys

    from qmagic.errors import ControlChannelError

    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    worker = make_worker({})
    service = RemoteService(worker)
    ctx = zmq.Context()
    stranger, squatter = ctx.socket(zmq.SUB), ctx.socket(zmq.REP)
    try:
        service.start("tcp://127.0.0.1:*")
        publisher = service.start_info("tcp://127.0.0.1:*")
        address, period = publisher.address, publisher.status_period
        # Another program takes the channel's port while it starts again (once it let go of it)
        code = RemoteService._start.__code__
        source, first = inspect.getsourcelines(RemoteService._start)
        line = first + next(i for i, text in enumerate(source) if "server.start()" in text)
        channel = service.server.address

        def take_the_port(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not squatter.last_endpoint:
                squatter.bind(channel)
            return take_the_port
        sys.settrace(lambda frame, event, arg: take_the_port if frame.f_code is code else None)
        try:
            with pytest.raises(ControlChannelError, match="already in use"):
                worker.zmq_client_keys = {"clients": [
                    {"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]}]}
        finally:
            sys.settrace(None)
        assert squatter.last_endpoint
        assert service.server is None or not service.server.running
        assert service.info is not None and service.info.running and service.info is not publisher
        assert _shut_out(stranger, address, period)
    finally:
        stranger.close(0)
        squatter.close(0)
        ctx.term()
        service.close()


def test_an_interrupt_while_a_key_list_is_turned_on_still_closes_the_info_socket(make_worker, monkeypatch,
                                                                                   sigint_as_in_a_cell):
    """A key list turned on starts the control channel and the info socket again (their
    security is set at bind).  A ■ while the channel started again was raised as soon as it
    served, before the info socket's restart: the live streams stayed open to any client
    while the setting said listed clients only.  Now both restart, then ■ is raised."""
    import sys

    from interrupt_points import lines_of, sigint_at

    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    worker = make_worker({})
    service = RemoteService(worker)
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.SUB)
    try:
        service.start("tcp://127.0.0.1:*")
        publisher = service.start_info("tcp://127.0.0.1:*")
        address, period = publisher.address, publisher.status_period
        code = RemoteService._stop_server.__code__  # (as the channel moves)
        fired: list[int] = []
        sys.settrace(sigint_at(code, lines_of(code)[0], fired))
        try:
            with pytest.raises(KeyboardInterrupt):
                worker.zmq_client_keys = {"clients": [
                    {"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]}]}
        finally:
            sys.settrace(None)
        assert fired
        assert service.info is not None and service.info.address == address
        assert _shut_out(stranger, address, period)
    finally:
        stranger.close(0)
        ctx.term()
        service.close()


def test_a_key_taken_out_of_the_list_no_longer_receives_the_streams(make_worker, monkeypatch):
    """0MQ checks a client key only at the handshake: a subscriber whose key was taken out of
    QMagic.zmq_client_keys kept receiving the status, task events and console output over the
    connection it had, for as long as it stayed connected.  The info socket now drops its
    connections when a key is revoked; the listed subscribers reconnect, the revoked one is
    refused at the handshake."""
    from zmq.utils.monitor import recv_monitor_message

    monkeypatch.setenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", SERVER_SECRET)
    keys = {"clients": [{"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]},
                        {"public_key": ALICE[0], "user": "alice", "groups": ["primary"]}]}
    worker = make_worker({}, zmq_client_keys=keys)
    service = RemoteService(worker)
    publisher = service.start_info("tcp://127.0.0.1:*")
    ctx = zmq.Context()
    subs, monitor = {}, None
    try:
        for name, (public, secret) in (("robot", ROBOT), ("alice", ALICE)):
            sub = subs[name] = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = (
                SERVER_PUBLIC.encode(), public.encode(), secret.encode())
            sub.setsockopt(zmq.SUBSCRIBE, b"QS_Info")
            sub.connect(publisher.address)
        robot, alice = subs["robot"], subs["alice"]
        assert robot.poll(10_000) and alice.poll(10_000), "a listed client received no status within 10 s"
        monitor = robot.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.LINGER, 0)
        worker.zmq_client_keys = {"clients": [keys["clients"][1]]}  # robot out
        assert service.info is publisher and publisher.running  # (the same socket thread)
        assert monitor.poll(10_000), "the revoked subscriber's connection was not dropped within 10 s"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        while robot.poll(0):  # (what came before the connection dropped)
            robot.recv_multipart()
        while alice.poll(0):
            alice.recv_multipart()
        assert alice.poll(10_000), "the listed client did not receive the status again within 10 s"
        assert not robot.poll(int(2.5 * 1000 * publisher.status_period))  # two periods: nothing
    finally:
        if monitor is not None:
            subs["robot"].disable_monitor()
            monitor.close(0)
        for sub in subs.values():
            sub.close(0)
        ctx.term()
        service.close()


def test_an_encryption_the_info_socket_cannot_take_leaves_the_settings_as_it_runs(make_worker, monkeypatch):
    """No CurveZMQ key, the info socket plain, a client key list set (it applies to the
    channel only): asking for encryption is refused and the settings keep saying what runs
    (a reviewer: zmq_info_encrypted stayed True over a plain socket)."""
    from qmagic import ControlChannelError

    monkeypatch.delenv("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", raising=False)
    worker = make_worker({}, zmq_info_encrypted=False)
    service = RemoteService(worker)
    try:
        info = service.start_info("tcp://127.0.0.1:*")
        worker.zmq_client_keys = {"clients": [{"public_key": ROBOT[0], "user": "robot", "groups": ["primary"]}]}
        with pytest.raises(ControlChannelError, match="needs CurveZMQ"):
            worker.zmq_info_encrypted = True
        assert worker.zmq_info_encrypted is False and service.info is info and info.running
        assert worker.zmq_info_address == info.address
    finally:
        service.close()
