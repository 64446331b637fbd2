"""What the info socket's subscribers may make the kernel hold (qmagic.remote.pub_socket):
each subscriber connection could hold 10,000 messages of up to 1.2 MB of JSON while it did
not read (a subscriber that stopped reading while a task printed 50 MB of non-ASCII text
grew the kernel by 290 MB), and nothing bounded how many subscribers connected.  Now a
subscriber holds at most 1,000 messages of at most 64 KiB, and the socket refuses
subscribers beyond ``QMagic.zmq_max_connections`` (the control channel's machinery)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import zmq

from qmagic.protocol import status_reply
from qmagic.remote import connections, info
from qmagic.remote.service import RemoteService

from child_process import end_child
from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture
from polling import eventually

pytestmark = pytest.mark.timeout(120)

SILENCE_MS = 300  # how long a refused subscriber is watched for a message that must not come


@pytest.fixture(autouse=True)
def patience(monkeypatch):
    """A connection at the limit waits less for the count to fall before it is refused (2 s
    in use): the refusals here come sooner.  The status goes out every 0.25 s, not every
    second: a subscriber is known to be in once it arrives."""
    monkeypatch.setattr(connections, "PATIENCE_S", 0.5)
    monkeypatch.setattr(info, "STATUS_PERIOD_S", 0.25)


class Subscribers:
    """SUB sockets of every topic on one address, closed at the end."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context()

    def connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        self.ctx.destroy(0)


def receives(sock: zmq.Socket, text: str) -> bool:
    """Whether ``text`` reaches ``sock`` on the console (other messages skipped; ``""``: any
    message)."""
    while sock.poll(TIMEOUT * 1000):
        topic, payload = sock.recv_multipart()
        if not text or topic == b"QS_Console" and text in json.loads(payload)["msg"]:
            return True
    return False


def receives_nothing(sock: zmq.Socket) -> bool:
    return not sock.poll(SILENCE_MS)


def test_a_subscriber_beyond_the_limit_gets_nothing_while_the_others_get_everything(make_worker, caplog):
    worker = make_worker({}, zmq_max_connections=3, zmq_info_address="tcp://127.0.0.1:*",
                         zmq_control_address="tcp://127.0.0.1:*")
    service = RemoteService(worker)
    subs = Subscribers(service.info.address)
    try:
        pub = service.info
        first = [subs.connect() for _ in range(3)]
        for sock in first:  # (connected and subscribed once the periodic status arrives)
            assert sock.poll(TIMEOUT * 1000), "a subscriber within the limit got nothing"
        assert pub.connections.held == 3 and pub.connections.refused == 0
        with caplog.at_level(logging.WARNING, logger="qmagic"):
            fourth = subs.connect()
            eventually(lambda: pub.connections.refused >= 1, what="the fourth subscriber refused")
            worker.submit(lambda: print("for the first three")).wait(TIMEOUT)
            assert all(receives(sock, "for the first three") for sock in first)
            assert receives_nothing(fourth)
        warnings = [r.getMessage() for r in caplog.records if "zmq_max_connections" in r.getMessage()]
        assert len(warnings) == 1, warnings  # said once
        assert warnings[0].startswith("qmagic: the info socket refused a connection: 3 are open")
        text = service.describe()
        assert "  info socket: 3 connections open, at most 3 (QMagic.zmq_max_connections); " in text, text
        assert "refused at the limit" in text
        assert "\n  0 connections open, at most 3 (QMagic.zmq_max_connections)\n" in text  # (counted apart)

        fourth.close(0)
        first[0].close(0)  # a place frees
        eventually(lambda: pub.connections.held == 2, what="the closed connection counted out")
        again = subs.connect()
        assert again.poll(TIMEOUT * 1000), "a subscriber got nothing once a place freed"
        assert all(receives(sock, "") for sock in first[1:])
        worker.zmq_max_connections = 4  # applies to the info socket's next connection too
        assert pub.max_connections == service.server.max_connections == 4
        fifth = subs.connect()
        assert fifth.poll(TIMEOUT * 1000), "the fifth subscriber got nothing"
    finally:
        subs.close()
        service.close()


PUBLISHER = r"""
import sys, time
from traitlets.config import Config
import qmagic
from qmagic import Worker
from qmagic.remote.info import InfoPublisher

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

config = Config()
config.QMagic.state_dir = sys.argv[1]
config.QMagic.journal_enabled = False
worker = Worker({}, config=config)
pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: {}, status_period=0.05).start()
print(pub.address, flush=True)
sys.stdin.readline()  # the subscriber is subscribed (and reads no more)
task = qmagic.Task("uid-1", "f", user="u", user_group="g", background=True)
text = "\u00e9" * 99_999 + "\n"  # (6 bytes of JSON a character)

def sent(text):  # one write, sent on its own: the publisher took it before the next one
    pub._on_output(task, text)
    deadline = time.monotonic() + 30
    while pub._console_chars and time.monotonic() < deadline:
        time.sleep(0.001)

before = peak_kb()
for _ in range(300):
    sent(text)
sent("end\n")  # (taken once the last large write was sent)
print(before, peak_kb(), pub._console_dropped, flush=True)
pub.stop()
worker.close()
"""


def test_a_subscriber_that_does_not_read_holds_a_bounded_share_of_memory(tmp_path):
    """A subscriber stops reading while a task prints 30 MB of non-ASCII text (180 MB of
    JSON) in writes the publisher sends one by one: 0MQ kept every message for it, the
    kernel's peak memory grew 171 MB; now at most 256 messages of 32 KiB.  (Counted: the
    publisher takes each write before the next; the peak is read from /proc.)"""
    child = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    try:
        address = child.stdout.readline().strip()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.RCVHWM, 1)  # (its own queue holds almost nothing: the kernel's does)
        sub.setsockopt(zmq.RCVBUF, 4096)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(address)
        assert sub.poll(TIMEOUT * 1000), "never subscribed"
        sub.recv_multipart()
        child.stdin.write("go\n")
        child.stdin.flush()
        before, peak, dropped = map(int, child.stdout.readline().split())
        grown_mb = (peak - before) / 1024
        print(f"\nthe publisher's peak memory grew {grown_mb:.0f} MB")
        assert dropped == 0  # (every write was sent: it is 0MQ's queue that is bounded)
        assert grown_mb < 100, grown_mb  # (256 x 32 KiB at most; before: 171 MB)
    finally:
        ctx.destroy(0)
        end_child(child, TIMEOUT)


def test_console_text_goes_out_in_messages_of_bounded_size():
    """Pieces of at most the given JSON size each, joined in order, whatever the characters."""
    from qmagic.remote.pub_socket import pieces

    texts = ["a\n", "\u00e9" * 10_000, "\x01" * 5000, "\U0001f600" * 3000, "b" * 40_000, "c\n"]
    out = pieces(texts, limit=8192)
    assert "".join(out) == "".join(texts)
    assert all(len(json.dumps(m)) - 2 <= 8192 for m in out)
    assert pieces(["x\n"] * 1000, limit=8192) == ["x\n" * 1000]  # (small writes: one message)


def test_a_long_progress_message_is_cut_in_task_events():
    from qmagic.core.status import Progress
    from qmagic.remote.info import _progress_data

    data = _progress_data(Progress(1, 2, "m" * 1_000_000))
    assert len(data["message"]) < 3000 and data["message"].startswith("mmm")


def test_status_reply_is_far_below_the_message_bound(make_worker):
    from qmagic.remote.pub_socket import MESSAGE_MAX_BYTES

    worker = make_worker({})
    assert len(json.dumps({"status": status_reply(worker)})) < MESSAGE_MAX_BYTES // 10
