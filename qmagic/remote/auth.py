"""Authenticated client identities on the CurveZMQ control channel.

Without a client key list, CurveZMQ only encrypts: any client that knows the server's
public key may send any ``user`` and ``user_group`` (``root`` included) — they are claims.
With a list, each client public key is bound to a user name and the groups it may claim:

.. code-block:: yaml

    clients:
      - public_key: "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"   # quote: z85 uses YAML characters
        user: alice
        groups: [primary]
      - public_key: "..."
        user: beamline-robot
        groups: [operators, primary]   # the first one is used when a request names none
      - public_key: "..."
        user: null                     # a front end that acts for many users: any user name
        groups: [primary]

How it holds together:

- :class:`CurveAuthenticator` is the ZAP handler (:mod:`qmagic.remote.zap`) of the zmq
  context of the control socket: a connection whose client key is not in the list is
  refused during the handshake, so the client times out exactly as with a wrong server key
  (the same handler bounds the open connections: :mod:`qmagic.remote.connections`).
- :func:`secure_server_socket` makes the server socket a CURVE server in the ZAP domain
  :data:`ZAP_DOMAIN` with ``ZAP_ENFORCE_DOMAIN``: if no authenticator runs, *every*
  connection is refused (libzmq would otherwise let all clients in, and it ignores the
  enforcement when the domain is empty).
- For every message, :func:`identity_of` reads the ``User-Id`` property that ZAP set on the
  frame (the client's z85 public key) and returns its :class:`ClientIdentity`; then
  :func:`check_claim` fills in or checks ``user`` and ``user_group``, and
  :func:`check_method` keeps the methods that could undo the list (``permissions_set``,
  ``permissions_reload``, ``config_get`` — the kernel connection file gives full control)
  for keys that may claim ``root``.

bluesky-queueserver's clients (REManagerAPI, ``qserver``, bluesky-httpserver) present one
fixed key pair whose secret key is published in their source code
(:data:`QUEUESERVER_CLIENT_PUBLIC_KEY`); that key is refused in a list, and each client
must present a key pair of its own (README, "Security").
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from ..errors import ControlChannelError, RequestRefused
from ..format import safe_repr
from ..yamlfile import load_yaml_file
from .connections import ConnectionLimit
from .zap import ZapThread

__all__ = [
    "QUEUESERVER_CLIENT_PUBLIC_KEY",
    "ROOT_METHODS",
    "ZAP_DOMAIN",
    "ClientIdentity",
    "ClientKeys",
    "CurveAuthenticator",
    "check_claim",
    "check_method",
    "identity_of",
    "secure_server_socket",
]

log = logging.getLogger(__name__)

ZAP_DOMAIN = "qmagic"
"""The ZAP domain of the control socket (must not be empty: see the module docstring)."""

QUEUESERVER_CLIENT_PUBLIC_KEY = "wt8[6a8eoXFRVL<l2JBbOzs(hcI%kRBIr0Do/eLC"
"""The public key that bluesky-queueserver's clients present; its secret key is public."""

ROOT_METHODS = frozenset({"permissions_set", "permissions_reload", "config_get"})
"""Methods that only a key allowed the group ``root`` may call when a key list is on."""

_MAX_CLIENTS = 1000
_MAX_NAME = 100
_ENTRY_KEYS = ("public_key", "user", "groups")
_KEYGEN = "python -c \"import zmq; print(zmq.curve_keypair())\""


@dataclass(frozen=True)
class ClientIdentity:
    """Who a client key belongs to.

    ``user``: the user name the key acts as (``None``: a front end that may send any user
    name); ``groups``: the user groups it may claim, the first one being its default.
    """

    public_key: str
    user: str | None
    groups: tuple[str, ...]


class ClientKeys:
    """A validated, immutable list of client keys (thread-safe to read)."""

    __slots__ = ("_by_key",)

    def __init__(self, identities: Iterable[ClientIdentity] = ()) -> None:
        self._by_key = {identity.public_key: identity for identity in identities}

    @classmethod
    def from_config(cls, value: dict | str | os.PathLike | None) -> ClientKeys | None:
        """The list from a dict (``{"clients": [...]}``) or a YAML file path; None for None
        or an empty path (no list: user and group stay claims).

        Raises :class:`~qmagic.errors.ControlChannelError` naming the faulty place.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (str, os.PathLike)):
            return cls.from_file(value)
        return cls._parse(value, "Client key list")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ClientKeys:
        """Read the list from a YAML file: a regular file of at most 1 MiB, owned by you or
        root and writable by nobody else (whoever can write it can give themselves any group)."""
        path = os.fspath(path)
        what = f"Client key file '{path}'"
        data = load_yaml_file(path, what, ControlChannelError, private=True,
                              hint=" (quote the keys: z85 uses characters that YAML reads as syntax)")
        return cls._parse(data, what)

    @classmethod
    def _parse(cls, data: Any, what: str) -> ClientKeys:
        def fail(where: str, problem: str) -> ControlChannelError:
            return ControlChannelError(f"{what}: {where}: {problem}" if where else f"{what}: {problem}")

        if not isinstance(data, dict) or set(data) != {"clients"}:
            raise fail("", "must be a mapping with the single key 'clients' (a list of entries with "
                           "'public_key', 'user' and 'groups')")
        entries = data["clients"]
        if not isinstance(entries, list):
            raise fail("clients", f"must be a list, not {type(entries).__name__}")
        if len(entries) > _MAX_CLIENTS:
            raise fail("clients", f"{len(entries)} entries, more than {_MAX_CLIENTS}")
        seen: dict[str, int] = {}
        identities = []
        for i, entry in enumerate(entries):
            at = f"clients[{i}]"
            if not isinstance(entry, dict):
                raise fail(at, f"must be a mapping with {', '.join(_ENTRY_KEYS)}, not {type(entry).__name__}")
            for key in entry:
                if key not in _ENTRY_KEYS:
                    raise fail(at, f"unsupported key {safe_repr(key, 60)}; supported keys: {', '.join(_ENTRY_KEYS)}")
            for key in _ENTRY_KEYS:
                if key not in entry:
                    raise fail(at, f"missing {key!r}")
            try:
                key = cls._public_key(entry["public_key"])
            except ValueError as exc:
                raise fail(f"{at}.public_key", str(exc)) from None
            if key in seen:
                raise fail(f"{at}.public_key", f"the same key as clients[{seen[key]}]: a key belongs to one client")
            seen[key] = i
            user = entry["user"]
            if user is not None and not cls._is_name(user):
                raise fail(f"{at}.user", f"{safe_repr(user, 60)} must be a user name (a non-empty string of at most "
                                         f"{_MAX_NAME} printable characters) or null (any user name)")
            groups = entry["groups"]
            if not isinstance(groups, list) or not groups:
                raise fail(f"{at}.groups", f"must be a non-empty list of user group names, not {safe_repr(groups, 60)}")
            for j, group in enumerate(groups):
                if not cls._is_name(group):
                    raise fail(f"{at}.groups[{j}]", f"{safe_repr(group, 60)} must be a group name (a non-empty "
                                                    f"string of at most {_MAX_NAME} printable characters)")
            identities.append(ClientIdentity(key, user, tuple(dict.fromkeys(groups))))
        return cls(identities)

    @staticmethod
    def _public_key(value: Any) -> str:
        """The z85 text of a client public key; ValueError saying what is wrong."""
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or len(value) != 40:
            raise ValueError(f"{safe_repr(value, 60)} is not a CurveZMQ public key (40 characters of z85 text, "
                             f"as printed by  {_KEYGEN}  or qserver-zmq-keys; quote it in YAML)")
        try:
            canonical = z85.encode(z85.decode(value.encode("ascii"))).decode("ascii") == value
        except Exception:  # noqa: BLE001 - z85 raises KeyError, ValueError, struct.error
            canonical = False
        if not canonical:
            raise ValueError(f"{safe_repr(value, 60)} is not valid z85 text: copy the public key exactly, in quotes")
        if value == QUEUESERVER_CLIENT_PUBLIC_KEY:
            raise ValueError("this is the key pair built into bluesky-queueserver's clients, whose secret key "
                             "is published with their source code: anybody can present it. Generate a key "
                             f"pair for this client ({_KEYGEN}) and make the client present it (README, "
                             "Security)")
        return value

    @staticmethod
    def _is_name(value: Any) -> bool:
        return isinstance(value, str) and 0 < len(value) <= _MAX_NAME and value.isprintable()

    def lookup(self, public_key: str | bytes | None) -> ClientIdentity | None:
        """The identity bound to a z85 public key, or None."""
        if isinstance(public_key, bytes):
            public_key = public_key.decode("ascii", "replace")
        return self._by_key.get(public_key) if isinstance(public_key, str) else None

    def groups(self) -> set[str]:
        """Every group some key may claim (to compare with the permission rules' groups)."""
        return {group for identity in self._by_key.values() for group in identity.groups}

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[ClientIdentity]:
        return iter(self._by_key.values())

    def __repr__(self) -> str:
        return f"<ClientKeys {len(self)} clients>"


class CurveAuthenticator:
    """The ZAP handler of one zmq context: admits CURVE connections whose client key is in
    ``keys`` (any key when ``keys`` is None) and NULL ones; with a ``limit``
    (:class:`~qmagic.remote.connections.ConnectionLimit`), only while fewer than its limit
    are open, counted from the monitor handed to :meth:`watch`.

    One per context (ZAP binds ``inproc://zeromq.zap.01`` in it): give the control socket a
    context of its own.  :meth:`start` before binding the socket, :meth:`stop` after closing
    it; stop releases the thread and both of its sockets.  ``keys`` may be replaced while
    running (new connections use the new list; pass the same list to :func:`identity_of`).
    """

    def __init__(self, context: zmq.Context, keys: ClientKeys | None, *, domain: str = ZAP_DOMAIN,
                 limit: ConnectionLimit | None = None) -> None:
        if not domain:
            raise ValueError("the ZAP domain must not be empty (libzmq would not enforce it)")
        self._context = context
        self._domain = domain.encode("utf-8")
        self.keys = keys
        self.limit = limit
        self._zap: ZapThread | None = None
        self._lock = threading.Lock()
        self._refused = 0
        self._last_refused: str | None = None

    def start(self) -> None:
        """Start the ZAP thread (no-op if running).  ControlChannelError if the context
        already has a ZAP handler."""
        with self._lock:
            if self._zap is not None:
                return
            limit = self.limit
            zap = ZapThread(self._context, self._decide, name="qmagic-zap",
                            on_event=limit.event if limit is not None else None,
                            on_watch=limit.reset if limit is not None else None)
            try:
                zap.start()
            except zmq.ZMQError as exc:
                raise ControlChannelError(
                    f"Cannot start the client key check: {exc} (another ZAP handler already runs in "
                    "this zmq context; give the control socket a context of its own)."
                ) from None
            self._zap = zap

    def stop(self) -> None:
        """Stop the ZAP thread and close its sockets (no-op if stopped)."""
        with self._lock:
            zap, self._zap = self._zap, None
            if zap is not None:
                zap.stop()

    def watch(self, monitor: zmq.Socket | None) -> bool:
        """Count the connections of the socket whose monitor is ``monitor`` (the previous
        socket's monitor disabled first; None: none); False if the thread does not run."""
        zap = self._zap
        return zap.watch(monitor) if zap is not None else False

    def is_alive(self) -> bool:
        """Whether the ZAP thread runs."""
        zap = self._zap
        return bool(zap is not None and zap.is_alive())

    @property
    def refused(self) -> int:
        """Handshakes refused for an unknown key so far (a refused client retries: several
        per client)."""
        return self._refused

    @property
    def last_refused_key(self) -> str | None:
        """The z85 public key of the last refused client (to add it to the list if wanted)."""
        return self._last_refused

    def _decide(self, domain: bytes, mechanism: bytes, credentials: list,
                waited: float = 0.0) -> tuple[bytes, bytes, bytes] | None:
        """A ZAP request's ``(status code, text, user id)``, or None to decide it again later
        (the ZAP thread; ``waited``: the seconds it has waited)."""
        if domain != self._domain:
            return b"400", b"Unknown domain", b""
        user_id = b""
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            user_id = z85.encode(credentials[0])
            if self.keys is not None and not self._admit(user_id):
                return b"400", b"Unknown key", b""
        elif mechanism != b"NULL" or self.keys is not None:  # (a key list: CurveZMQ only)
            return b"400", b"Unsupported mechanism", b""
        if self.limit is not None:
            admitted = self.limit.admit(waited)
            if admitted is None:
                return None
            if not admitted:
                return b"400", b"Too many connections", b""
        return b"200", b"OK", user_id

    def _admit(self, key: bytes) -> bool:
        if self.keys.lookup(key) is not None:
            return True
        self._refused += 1  # one writer: the ZAP thread
        self._last_refused = key.decode("ascii", "replace")
        log.debug("qmagic: refused a connection with the unknown client key %s", self._last_refused)
        return False

    def __enter__(self) -> CurveAuthenticator:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        keys = f"{len(self.keys)} keys" if self.keys is not None else "any key"
        return f"<CurveAuthenticator {'running' if self.is_alive() else 'stopped'} {keys}>"


def secure_server_socket(sock: zmq.Socket, secret_key: str | bytes | None, *, domain: str = ZAP_DOMAIN) -> None:
    """Make ``sock`` (before ``bind``) a CurveZMQ server (with ``secret_key``; None: NULL,
    no encryption) that refuses every connection the ZAP handler of its context does not
    admit — all of them if no handler runs (libzmq asks ZAP about NULL connections too when
    the socket has a domain)."""
    if not domain:
        raise ValueError("the ZAP domain must not be empty (libzmq would not enforce it)")
    if secret_key is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode("ascii") if isinstance(secret_key, str) else secret_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode("utf-8"))
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def identity_of(frame: zmq.Frame, keys: ClientKeys) -> ClientIdentity | None:
    """The identity of the client that sent ``frame`` (received with ``copy=False``), or
    None (no ZAP ``User-Id``, or a key no longer in ``keys``)."""
    try:
        user_id = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return keys.lookup(user_id)


def _not_listed() -> RequestRefused:
    return RequestRefused("Error: Request refused: this client's key is not in the kernel's list of "
                          "client keys; ask the kernel's administrator to add your public key.")


def check_claim(identity: ClientIdentity | None, user: object, user_group: object) -> tuple[Any, Any]:
    """``(user, user_group)`` for a request from ``identity``: a missing user becomes the
    key's user, a missing group the key's first group; a different user or a group the key
    may not claim raises :class:`~qmagic.errors.RequestRefused` (queueserver-style text)."""
    if identity is None:
        raise _not_listed()
    if user is None or user == "":
        user = identity.user
    elif identity.user is not None and user != identity.user:
        raise RequestRefused(
            f"Error: User name {safe_repr(user, 60)} does not match the client key, which belongs to "
            f"{identity.user!r}: send the user name {identity.user!r} or none "
            f"(REManagerAPI: RM.user = {identity.user!r})."
        )
    if user_group is None or user_group == "":
        user_group = identity.groups[0]
    elif user_group not in identity.groups:
        who = f"user {identity.user!r}" if identity.user is not None else "a front end"
        allowed = ", ".join(repr(g) for g in identity.groups)
        raise RequestRefused(
            f"Error: User group {safe_repr(user_group, 60)} is not allowed for the client key of {who}; "
            f"allowed groups: {allowed} (REManagerAPI: RM.user_group = {identity.groups[0]!r})."
        )
    return user, user_group


def check_method(identity: ClientIdentity | None, method: str,
                 root_methods: frozenset[str] = ROOT_METHODS) -> None:
    """Raise :class:`~qmagic.errors.RequestRefused` if ``method`` is one of ``root_methods``
    and the key may not claim the group ``root`` (or the key is not listed)."""
    if identity is None:
        raise _not_listed()
    if method in root_methods and "root" not in identity.groups:
        raise RequestRefused(
            f"Error: Method {method!r} is allowed only for client keys that may claim the user group "
            f"'root'; this key may claim {', '.join(repr(g) for g in identity.groups)}."
        )
