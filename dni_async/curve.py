"""ZeroMQ CURVE keys of a run: make them, load them, and admit only the expected neighbour on each socket."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from .transport.base import RejectLog

__all__ = ["CurveKeys", "Gate", "HandshakeWatch", "generate_keys", "key_paths", "load_keys", "start_gate"]

logger = logging.getLogger("dni_async.transport")

# [Note: CURVE on the data plane]
# Each stage has one key pair (``stage-<i>.key`` public, ``stage-<i>.key_secret``
# secret, pyzmq's certificate format). A stage's PULL sockets are CURVE servers
# with its secret key; its PUSH sockets are CURVE clients with its own key pair
# and the peer's public key as server key, so a connection is encrypted and both
# ends have proved their key. libzmq then asks the context's ZAP handler (a
# ThreadAuthenticator on the transport's own context, bound before the sockets:
# a CURVE server with no ZAP handler admits every client) whether the client's
# key may connect. Each PULL socket carries its direction as ZAP domain, and the
# gate admits on it only the one stage allowed to send there (stage - 1 on
# "forward", stage + 1 on "backward"); the gate counts and logs refusals at a
# bounded rate. A refused client gets no pipe: nothing it sends is ever read.
# libzmq does not retry after a ZAP refusal; a client holding a wrong server key
# retries every ~100 ms and is dropped each time before it reaches the gate.
#
# On the client side a socket monitor (HandshakeWatch, read by the thread that
# sends) turns such a failure into PeerLost at the first blocked send, with the
# reason, instead of a silent wait of peer_timeout.

_SECRET_BANNER = """#   ****  Generated on {0} by dni_async  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by dni_async  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Store public certificates in your home
#   directory, in the .curve subdirectory.

"""


def key_paths(directory: str | Path, stage: int) -> tuple[Path, Path]:
    """``(public, secret)`` key files of one stage in ``directory``."""
    return Path(directory) / f"stage-{stage}.key", Path(directory) / f"stage-{stage}.key_secret"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to a file that must not exist yet, created with ``mode`` (never readable by others first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have narrowed it; the secret stays 0600 either way


def generate_keys(directory: str | Path, stages: int) -> list[Path]:
    """Write one CURVE key pair per stage: ``stage-<i>.key`` (public) and ``stage-<i>.key_secret`` (0600).

    Args:
        directory: folder to write to; created (0700) if missing.
        stages: number of stages.

    Returns:
        The files written, public then secret for each stage.

    Raises:
        ValueError: if ``stages < 1`` or any of the files exists already (keys that may have been
            handed out are never replaced; remove them or pick another folder).
    """
    if stages < 1:
        raise ValueError(f"--stages must be >= 1, got {stages}")
    directory = Path(directory)
    paths = [p for i in range(stages) for p in key_paths(directory, i)]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ValueError(f"refusing to overwrite existing key files: {', '.join(existing)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for i in range(stages):
        public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
        public_path, secret_path = key_paths(directory, i)
        body = f'metadata\ncurve\n    public-key = "{public}"\n'
        _write_new(public_path, _PUBLIC_BANNER.format(now) + body, 0o644)
        _write_new(secret_path, _SECRET_BANNER.format(now) + body + f'    secret-key = "{secret}"\n', 0o600)
    return paths


@dataclass(frozen=True)
class CurveKeys:
    """One stage's key pair and the public keys of the run's stages (z85 text, as zmq's socket options take)."""

    stage: int
    public: bytes
    secret: bytes
    publics: tuple[bytes, ...]
    """Public key of every stage, by stage."""

    def serve(self, sock: zmq.Socket[Any], domain: str) -> None:
        """Make ``sock`` (not yet bound) a CURVE server with this stage's key; ``domain`` names it to the gate."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        # libzmq 4.3.5: behind a ZAP handler, a bound socket with RCVHWM 1 never delivers: the first
        # message is polled as readable but recv() says EAGAIN for good (reproduced on loopback; the
        # slot seems taken by the ZAP credential that the session queues first). 2 works, at the cost
        # of one more message buffered per inbound socket.
        sock.setsockopt(zmq.RCVHWM, max(2, sock.getsockopt(zmq.RCVHWM)))

    def connect_to(self, sock: zmq.Socket[Any], peer: int) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of stage ``peer``, proving this stage's key."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.publics[peer])


def _read_key(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from a certificate file, each checked to be a 32-byte z85 key; errors name the file."""
    what = "secret" if secret else "public"
    if not path.is_file():
        raise FileNotFoundError(f"CURVE {what} key file {path} is missing (make keys with `python -m dni_async keys "
                                f"DIR --stages N`; each host needs every public key and its own stages' secret keys)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except ValueError as err:
        raise ValueError(f"CURVE key file {path} is not a key certificate: {err}") from None
    if secret and secret_key is None:
        raise ValueError(f"CURVE key file {path} holds no secret key")
    for key in (public, secret_key):
        if key is not None and (len(key) != 40 or len(_z85_decode(key, path)) != 32):
            raise ValueError(f"CURVE key file {path} holds a malformed key (expected 40 z85 characters)")
    return public, secret_key


def _z85_decode(key: bytes, path: Path) -> bytes:
    """Decode a z85 key, or ValueError naming the file."""
    try:
        return z85.decode(key)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"CURVE key file {path} holds a malformed key (not z85)") from None


def load_keys(directory: str | Path, stage: int, num_stages: int) -> CurveKeys:
    """Load this stage's key pair and every stage's public key from ``directory``.

    Only this stage's secret key is needed: across hosts, copy every ``stage-<i>.key``
    and each host's own ``stage-<i>.key_secret``.

    Raises:
        FileNotFoundError: if the folder, a stage's public key or this stage's secret key is missing.
        ValueError: if a file is not a valid key certificate, or this stage's secret file does not
            belong to its public key.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CURVE key folder {directory} does not exist (make it with `python -m dni_async "
                                f"keys {directory} --stages {num_stages}`)")
    publics = tuple(_read_key(key_paths(directory, i)[0], secret=False)[0] for i in range(num_stages))
    public_path, secret_path = key_paths(directory, stage)
    public, secret = _read_key(secret_path, secret=True)
    assert secret is not None  # _read_key checked it
    if public != publics[stage]:
        raise ValueError(f"CURVE key files {secret_path} and {public_path} hold different key pairs")
    if zmq.curve_public(secret) != public:
        raise ValueError(f"CURVE key file {secret_path}: its secret key does not match its public key")
    if len(set(publics)) != num_stages:
        raise ValueError(f"CURVE key folder {directory}: two stages share a public key")
    mode = stat.S_IMODE(secret_path.stat().st_mode)
    if mode & 0o077:
        logger.warning("CURVE secret key %s is readable by others (mode %o); chmod 600 it", secret_path, mode)
    return CurveKeys(stage=stage, public=public, secret=secret, publics=publics)


class Gate:
    """ZAP credentials check: on each socket (ZAP domain) admit only the key of the one stage that may send there.

    ``callback`` runs on the authenticator's thread; ``refused`` is written only there.

    Args:
        keys: this stage's keys.
        senders: ZAP domain -> the stage allowed to connect to that socket (out of range: nobody).
    """

    def __init__(self, keys: CurveKeys, senders: Mapping[str, int]) -> None:
        self.allowed = {domain: keys.publics[peer] if 0 <= peer < len(keys.publics) else None
                        for domain, peer in senders.items()}
        self.senders = dict(senders)
        self._log = RejectLog("refused a CURVE handshake on the %s socket: %s", first=5)

    @property
    def refused(self) -> int:
        """Handshakes refused so far."""
        return self._log.count

    def callback(self, domain: str, key: bytes) -> bool:
        """True if ``key`` (z85) is the key of the stage that may send on the socket of ``domain``."""
        allowed = self.allowed.get(domain)
        if allowed is not None and key == allowed:
            return True
        expected = f"only stage {self.senders[domain]}'s key" if allowed is not None else "no client"
        self._log(domain, f"key {key.decode('ascii', 'replace')} is not allowed there (expected {expected})")
        return False


def start_gate(ctx: zmq.Context[Any], keys: CurveKeys, senders: Mapping[str, int]) -> tuple[ThreadAuthenticator, Gate]:
    """Start a ZAP authenticator on ``ctx`` that admits clients through a `Gate`; bind the servers after this.

    Returns:
        The running authenticator (``stop()`` it before terminating ``ctx``) and its gate.
    """
    gate = Gate(keys, senders)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("dni_async.transport.zap"))
    for domain in senders:  # pyzmq matches the domain exactly: register the gate under each
        auth.configure_curve_callback(domain, credentials_provider=gate)
    auth.start()
    auth.thread.name = f"dni-zmq-auth-{keys.stage}"
    return auth, gate


class HandshakeWatch:
    """Handshake failures of one outbound CURVE socket, seen through a socket monitor.

    Create it before the socket connects, in the thread that owns the socket (it owns the monitor too).
    A ZAP refusal is final (libzmq does not retry it). A handshake that fails without detail (the peer
    hangs up: it could not decrypt our hello, i.e. we hold a stale public key of it) counts as a
    failure only after `_UNDECRYPTABLE` retries in a row, so that a connection dropping mid-handshake is
    left to the usual peer_timeout.
    """

    _UNDECRYPTABLE = 5

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._failed_in_a_row = 0

    def failure(self) -> str | None:
        """Why the peer refused the handshake, if it did since the socket connected; never blocks."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._failed_in_a_row = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return (f"it refused this stage's CURVE key (ZAP status {value}): its key folder does not hold "
                        f"this stage's public key; use one run's keys on every host")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                return f"the CURVE handshake failed (protocol error {value:#x}); use one run's keys on every host"
            else:
                self._failed_in_a_row += 1
                if self._failed_in_a_row >= self._UNDECRYPTABLE:
                    return (f"the CURVE handshake failed {self._failed_in_a_row} times (errno {value}): the public "
                            f"key of the peer in this stage's key folder is likely not the one it runs with; use "
                            f"one run's keys on every host")
        return None

    def close(self) -> None:
        """Stop monitoring; before the socket closes."""
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
