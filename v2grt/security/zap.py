"""The aggregator side of the secured bus: the address allowlist, the ZAP handler (key, role, address), the
per-message checks, reload and revocation.

With ``security.enabled`` the aggregator is the CURVE server of all three bus sockets and every peer
(gateway, v2g-cli, another control system) authenticates with its own key pair. A ZAP handler on its
own thread (off the control loop) decides each handshake: the peer's address must be in
``security.allow`` (addresses and CIDR ranges; libzmq's and pyzmq's own allowlists match exact
addresses only), its public key must be in the ``security.authorized_keys`` directory, and the key's
role must be allowed on that socket. The reply attaches the key's identity to every message the peer
sends (ZAP User-Id ``gateway:gw3``, ``operator:alice`` or ``observer:scada``, read per message with
``frame.get("User-Id")``), which the receivers check per message: a gateway's telemetry must be for its
own gateway, only operators run commands that act, a gateway may subscribe to its own setpoints only.

CURVE authenticates at connect time only, so a reload that removes a key also drops the live
connections of the sockets that key authenticated on (``_Owner.rebind``); messages that still arrive
from such a connection before the drop are refused per message. docs/security.md has the threat model.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from v2grt.config import ConfigError
from v2grt.events import EventLog
from v2grt.io import wire
from v2grt.io.bus import BusError
from v2grt.security.keys import (
    ROLES,
    AuthorizedKey,
    KeyRing,
    SecurityError,
    fingerprint,
    load_secret_key,
)

log = logging.getLogger("v2grt.security")

SOCKET_ROLES: dict[str, frozenset[str]] = {
    "setpoints": frozenset(ROLES),  # what each may subscribe to: authorize_subscription
    "telemetry": frozenset({"gateway"}),
    "control": frozenset(ROLES),  # what each may send: authorize_control
}
ZAP_DOMAIN_PREFIX = "v2grt."
#: Control commands any authenticated key may send; every other command needs an operator key.
#: status is read-only fleet aggregates (what a gateway's own setpoints already imply, roughly).
READ_ONLY_COMMANDS = frozenset({"status"})
#: ZAP metadata property carrying the peer's public key (z85) on every message, next to User-Id:
#: the per-message revocation check looks it up in the current authorized keys.
KEY_PROPERTY = "X-V2G-Key"
#: engine.log codes whose counts say who was refused or what keys did: in a status reply to operator keys only.
SECURITY_EVENT_CODES = frozenset({"ZAP_ACCEPTED", "ZAP_DENIED", "FORBIDDEN", "SUBSCRIPTION_DENIED", "CONTROL_COMMAND",
                                  "KEYS_RELOADED", "KEYS_RELOAD_FAILED", "KEYS_REVOKED_DISCONNECT",
                                  "KEYS_REBIND_FAILED", "KEY_FILE_IGNORED", "KEYS_DIR_WRITABLE"})
#: A revocation drops a socket's connections this long after the reload: the control socket waits so the
#: reply to `keys_reload` leaves first; the others drop at their owner thread's next turn.
REBIND_DELAY_S = {"setpoints": 0.0, "telemetry": 0.0, "control": 0.1}
#: A rebind whose unbind failed (the socket still bound, its connections still up) is tried again after this.
REBIND_RETRY_S = 1.0
#: How long one rebind may wait for the old listener to release the port before it gives up until its owner's
#: next turn. Measured on loopback under load (2 cores, ~7 users): a PUB's port free again after median 2.1 ms,
#: max 9 ms; a PULL's or ROUTER's 0.4 ms, max 4 ms. The control thread's wait is inside the cycle (gate closed,
#: image locked), so short: a retry at the next cycle costs the gateways a period more of reconnect back-off;
#: the bus thread's delays a control request at most this. Before: up to 1 s, inside the cycle (review F1).
REBIND_WAIT_S = {"setpoints": 0.005, "telemetry": 0.01, "control": 0.01}
#: A socket left unbound by a failed rebind (no peer can connect) is bound again at its owner's next turn:
#: the next cycle for the setpoint PUB, a bus-thread wake-up at most this later for the others.
REBIND_UNBOUND_RETRY_S = 0.002


# ---------------------------------------------------------------------------------------------------
# the address allowlist


class AddressAllowlist:
    """Addresses and CIDR ranges (IPv4 and IPv6); None or no entries given: every address is allowed."""

    def __init__(self, entries: Iterable[str] | None):
        self.entries = None if entries is None else list(entries)
        self.networks = None if entries is None else [parse_network(e, i) for i, e in enumerate(self.entries)]

    def permits(self, address: str) -> bool:
        if self.networks is None:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return False  # ipc:// peers have no IP address: an allowlist admits TCP peers only
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self.networks)


def parse_network(entry, index: int | None = None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    where = "security.allow" + (f"[{index}]" if index is not None else "")
    if not isinstance(entry, str):
        raise ValueError(f"{where}={entry!r}: expected an address or CIDR range as a string, e.g. '10.1.0.0/24'")
    try:
        return ipaddress.ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{where}={entry!r}: not an address or CIDR range ({exc}); e.g. '10.1.0.17' or "
                         "'10.1.0.0/24' (host bits zero)") from None


def check_config(src: str, cfg) -> None:
    """config.py's checks for the `security` section: allow entries, and with enabled the key files."""
    sec = cfg.security
    if sec.allow is not None:
        if not isinstance(sec.allow, list):
            raise ConfigError(f"{src}: security.allow={sec.allow!r}: expected a list of addresses and CIDR ranges, "
                              "or null for any address")
        if not sec.allow:
            raise ConfigError(f"{src}: security.allow=[] would refuse every peer; list the gateway and operator "
                              "addresses, or remove the key to allow any address")
        for i, entry in enumerate(sec.allow):
            try:
                parse_network(entry, i)
            except ValueError as exc:
                raise ConfigError(f"{src}: {exc}") from None
    if not sec.enabled:
        return
    if not sec.server_secret_key:
        raise SecurityError(f"{src}: security.enabled is true but security.server_secret_key is not set: create the "
                            "aggregator's key pair with `v2grt keys generate aggregator --dir KEYS_DIR` and set "
                            "security.server_secret_key to KEYS_DIR/aggregator.key_secret")
    if not sec.authorized_keys:
        raise SecurityError(f"{src}: security.enabled is true but security.authorized_keys is not set: set it to the "
                            "directory of authorized public keys (`v2grt keys authorize FILE --as ROLE:NAME --dir "
                            "DIR`)")
    try:
        load_secret_key(cfg.resolve(sec.server_secret_key), "security.server_secret_key")
        KeyRing.load(cfg.resolve(sec.authorized_keys))
    except SecurityError as exc:
        raise SecurityError(f"{src}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# the aggregator side: ZAP handler and per-message checks


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread with v2grt's decision: address (CIDR), key, role per socket; counts refusals."""

    def __init__(self, context: zmq.Context, security: ServerSecurity):
        super().__init__(context, log=logging.getLogger("v2grt.security.zap"))
        self.security = security

    def start(self) -> None:
        try:
            super().start()
        except zmq.ZMQError as exc:
            self.stop()
            raise SecurityError(f"cannot start the ZAP handler: {exc} (a context has one ZAP handler; is another "
                                "aggregator or authenticator using this zmq.Context?)") from None
        self.thread.name = "v2grt-zap"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """One ZAP request: reply 200 with User-Id and the key property, or 400 with the reason."""
        request_id = msg[1] if len(msg) > 1 else None
        try:
            verdict = self.security._decide(msg)
        except Exception:
            log.exception("ZAP handler failed; denying")
            verdict = (b"500", b"internal error in the ZAP handler", b"", b"")
        if request_id is None:
            return
        code, text, user_id, metadata = verdict
        self.zap_socket.send_multipart([b"1.0", request_id, code, text, user_id, metadata])


def _zmtp_metadata(props: Mapping[str, str]) -> bytes:
    """ZMTP metadata: name length (1 byte), name, value length (4 bytes, big-endian), value."""
    out = bytearray()
    for name, value in props.items():
        n, v = name.encode("ascii"), value.encode("utf-8")
        out += bytes([len(n)]) + n + len(v).to_bytes(4, "big") + v
    return bytes(out)


class ServerSecurity:
    """The aggregator's security: its key, the authorized keys, the allowlist, the ZAP thread, the checks.

    Counters for metrics (plain ``collections.Counter``, read from any thread):
    ``refusals`` handshakes refused by reason (ADDRESS_NOT_ALLOWED, UNKNOWN_KEY, ROLE_NOT_ALLOWED, ...),
    ``accepted`` handshakes accepted by socket, ``forbidden`` authenticated messages refused by kind
    (telemetry, control, subscription), ``rebinds`` connection drops after a revocation by socket.
    """

    def __init__(self, cfg, ctx: zmq.Context, events: EventLog | None = None):
        sec = cfg.security
        self.events = events or EventLog()
        self.server_key = load_secret_key(cfg.resolve(sec.server_secret_key), "security.server_secret_key")
        self.keys_dir = cfg.resolve(sec.authorized_keys)
        self.allowlist = AddressAllowlist(sec.allow)
        self._ring = KeyRing.load(self.keys_dir)
        self._report_problems(self._ring)
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        #: public keys that completed a handshake per socket since its last rebind (whom a revocation drops)
        self._seen: dict[str, set[bytes]] = {name: set() for name in SOCKET_ROLES}
        self._rebind_due: dict[str, int] = {}
        self.refusals: collections.Counter[str] = collections.Counter()
        self.accepted: collections.Counter[str] = collections.Counter()
        self.forbidden: collections.Counter[str] = collections.Counter()
        self.rebinds: collections.Counter[str] = collections.Counter()
        self.last_rebind_ms: dict[str, float] = {}
        self.last_rebind_at_ns: dict[str, int] = {}
        self.last_rebind_seq: int | None = None
        self.reloads = 0
        if os.geteuid() != 0 and os.access(self.keys_dir, os.W_OK):  # root may write anything anyway
            self.events.emit("KEYS_DIR_WRITABLE", logging.WARNING, key="keys_dir", path=str(self.keys_dir),
                             message="the service account can change its own authorized keys; make the directory "
                                     "root-owned, mode 0755 (docs/security.md, least privilege)")
        self.authenticator = Authenticator(ctx, self)

    def start(self) -> ServerSecurity:
        """Start the ZAP thread; before any socket binds (a CURVE socket without ZAP refuses everyone)."""
        self.authenticator.start()
        log.info("SECURITY enabled: %d authorized keys from %s; allow=%s; server key %s", len(self._ring),
                 self.keys_dir, self.allowlist.entries or "any address", fingerprint(self.server_key.public_key))
        return self

    def stop(self) -> None:
        """Stop the ZAP thread and close its socket (after the bus sockets closed, before Context.term())."""
        self.authenticator.stop()

    @property
    def keyring(self) -> KeyRing:
        return self._ring

    # ---------------------------------------------------------------------------------- bus wiring
    def curve(self, socket_name: str) -> dict:
        """The ``curve=`` mapping of one aggregator socket: its secret key and its ZAP domain."""
        return {"secret_key": self.server_key.secret_key, "zap_domain": ZAP_DOMAIN_PREFIX + socket_name}

    def bus_options(self, socket_name: str) -> dict:
        """Keyword arguments for the bus constructor of ``socket_name`` (setpoints, telemetry, control)."""
        hooks = {"setpoints": {"subscribe_policy": self.authorize_subscription},
                 "telemetry": {"authorize": self.authorize_telemetry},
                 "control": {"authorize": self.authorize_control}}
        return {"curve": self.curve(socket_name), **hooks[socket_name]}

    def on_cycle(self, agg, result=None, times=None) -> None:
        """Cycle hook (control thread, owner of the setpoint PUB): drop its connections after a revocation.

        Subscriptions are admitted at the start of each publish phase (Aggregator._publish), so a
        gateway that reconnects is served in the first cycle after its subscription arrives.
        """
        if self._rebind_due:
            before = self.rebinds["setpoints"]
            self._rebind_if_due("setpoints", agg.publisher)
            if self.rebinds["setpoints"] != before:
                self.last_rebind_seq = agg.seq  # the last cycle published before the drop

    def bus_tick(self, telemetry, control) -> None:
        """Bus-thread hook (owner of the telemetry PULL and control ROUTER): drop connections if revoked."""
        if self._rebind_due:
            self._rebind_if_due("telemetry", telemetry)
            self._rebind_if_due("control", control)

    def bus_poll_ms(self, longest_ms: int) -> int:
        """How long the bus thread may block on its sockets: ``longest_ms``, or until a rebind of one of its
        sockets is due (at least 1 ms), so a socket left unbound is bound again within milliseconds."""
        with self._lock:
            due = [self._rebind_due[n] for n in ("telemetry", "control") if n in self._rebind_due]
        if not due:
            return longest_ms
        return max(1, min(longest_ms, -(-(min(due) - time.monotonic_ns()) // 1_000_000)))

    # ---------------------------------------------------------------------------------- ZAP decision
    def _decide(self, msg: list[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
        if len(msg) < 6 or msg[0] != b"1.0":
            return self._deny("BAD_REQUEST", "?", "?", "malformed ZAP request")
        _version, _rid, domain, address, _identity, mechanism, *credentials = msg
        address = address.decode("utf-8", "replace")
        domain = domain.decode("utf-8", "replace")
        socket_name = domain.removeprefix(ZAP_DOMAIN_PREFIX)
        if not domain.startswith(ZAP_DOMAIN_PREFIX) or socket_name not in SOCKET_ROLES:
            return self._deny("UNKNOWN_DOMAIN", address, domain, f"ZAP domain {domain!r} is not a v2grt socket")
        if not self.allowlist.permits(address):
            return self._deny("ADDRESS_NOT_ALLOWED", address, socket_name,
                              "peer address is not in security.allow")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._deny("WRONG_MECHANISM", address, socket_name,
                              f"mechanism {mechanism.decode('ascii', 'replace')}: CURVE with a client key required")
        public = z85.encode(credentials[0])
        with self._lock:
            entry = self._ring.by_public.get(public)
            if entry is not None and entry.identity.role in SOCKET_ROLES[socket_name]:
                self._seen[socket_name].add(public)
                self.accepted[socket_name] += 1
        if entry is None:
            return self._deny("UNKNOWN_KEY", address, socket_name, "public key not in security.authorized_keys",
                              pubkey=fingerprint(public))
        if entry.identity.role not in SOCKET_ROLES[socket_name]:
            return self._deny("ROLE_NOT_ALLOWED", address, socket_name,
                              f"role {entry.identity.role} may not connect to the {socket_name} socket",
                              pubkey=fingerprint(public), key_name=entry.name, identity=str(entry.identity))
        self.events.emit("ZAP_ACCEPTED", logging.INFO, key=f"{entry.name}/{socket_name}", address=address,
                         socket=socket_name, key_name=entry.name, identity=str(entry.identity))
        return (b"200", b"OK", str(entry.identity).encode(), _zmtp_metadata({KEY_PROPERTY: public.decode()}))

    def _deny(self, reason: str, address: str, socket_name: str, message: str, **fields) -> tuple:
        self.refusals[reason] += 1
        self.events.emit("ZAP_DENIED", logging.WARNING, key=f"{address}/{reason}", address=address,
                         socket=socket_name, reason=reason, message=message, **fields)
        return (b"400", reason.encode(), b"", b"")

    # ---------------------------------------------------------------------------------- per message
    def _peer(self, frame: zmq.Frame) -> AuthorizedKey | None:
        """The authorized key a message came from, or None if that key is no longer authorized as it was."""
        try:
            public, user = frame.get(KEY_PROPERTY), frame.get("User-Id")
        except zmq.ZMQError:  # no ZAP metadata: cannot happen on a socket with a ZAP domain
            return None
        entry = self._ring.by_public.get(public.encode())
        return entry if entry is not None and str(entry.identity) == user else None

    def authorize_telemetry(self, frame: zmq.Frame, batch: wire.TelemetryBatch) -> None:
        """A batch is accepted only from a gateway key, and only for that key's own gateway id.

        The aggregator then maps the batch's node ids to rows of ``batch.gw`` (FOREIGN_NODE for the
        rest), so after this check the vehicles a batch can touch are those of the authenticated gateway.
        """
        entry = self._peer(frame)
        if entry is None:
            raise self._forbidden("telemetry", f"telemetry {batch.gw!r} seq {batch.seq}: the sender's key is no "
                                               "longer authorized (revoked); batch dropped", frame)
        if entry.identity.role != "gateway" or entry.identity.name != batch.gw:
            raise self._forbidden("telemetry", f"telemetry claims gateway {batch.gw!r} but comes from key "
                                               f"{entry.name!r} authorized as {entry.identity}; batch dropped",
                                  frame, identity=str(entry.identity))

    def authorize_control(self, frame: zmq.Frame, request: wire.ControlRequest) -> None:
        """Any authorized key may ask for status; every other command needs an operator key."""
        entry = self._peer(frame)
        if entry is None:
            raise self._forbidden("control", f"{request.cmd}: the sender's key is no longer authorized (revoked)",
                                  frame)
        if request.cmd not in READ_ONLY_COMMANDS and entry.identity.role != "operator":
            raise self._forbidden("control", f"{request.cmd}: key {entry.name!r} is authorized as {entry.identity}, "
                                             f"which may only send {sorted(READ_ONLY_COMMANDS)}; commands that act "
                                             "need an operator key", frame, identity=str(entry.identity))
        if request.cmd not in READ_ONLY_COMMANDS:
            self.events.emit("CONTROL_COMMAND", logging.WARNING, key=f"{entry.identity}/{request.cmd}",
                             cmd=request.cmd, identity=str(entry.identity), key_name=entry.name,
                             address=_peer_address(frame))

    def authorize_subscription(self, frame: zmq.Frame, topic: bytes) -> bool:
        """A gateway key may subscribe to its own setpoints and the status; observers to the status only."""
        entry = self._peer(frame)
        if entry is not None and entry.topic_allowed(topic):
            return True
        self.forbidden["subscription"] += 1
        who = str(entry.identity) if entry is not None else "a revoked key"
        self.events.emit("SUBSCRIPTION_DENIED", logging.WARNING, key=f"{who}/{topic[:70]!r}", identity=who,
                         topic=repr(topic[:70]), address=_peer_address(frame))
        return False

    def status_for(self, report: dict, caller: str | None) -> dict:
        """The status reply for ``caller`` (a ZAP User-Id): all of it for an operator key; for every other key
        the fleet report without the ``security`` block and without the security codes' event counts
        (the allowlist, refusals and who acted are security details; wire.md section 13)."""
        if caller is not None and caller.partition(":")[0] == "operator":
            return report
        out = {k: v for k, v in report.items() if k != "security"}
        if isinstance(out.get("events"), dict):
            out["events"] = {code: n for code, n in out["events"].items() if code not in SECURITY_EVENT_CODES}
        return out

    def _forbidden(self, kind: str, message: str, frame: zmq.Frame, **fields) -> wire.WireError:
        self.forbidden[kind] += 1
        self.events.emit("FORBIDDEN", logging.WARNING, key=f"{kind}/{fields.get('identity', '?')}", kind=kind,
                         address=_peer_address(frame), message=message, **fields)
        return wire.WireError("FORBIDDEN", message)

    # ---------------------------------------------------------------------------------- reload, revoke
    def reload(self, source: str = "api") -> dict:
        """Re-read the authorized keys; schedule dropping the connections of removed keys; a summary.

        Raises SecurityError (the previous keys stay in force) when the directory cannot be read.
        """
        with self._reload_lock:
            ring = KeyRing.load(self.keys_dir)
            self._report_problems(ring)
            old = self._ring
            removed = [k for pk, k in old.by_public.items()
                       if pk not in ring.by_public or ring.by_public[pk].identity != k.identity]
            added = [k for pk, k in ring.by_public.items() if pk not in old.by_public]
            gone = {k.public_key for k in removed}
            now = time.monotonic_ns()
            with self._lock:
                self._ring = ring
                dropping = sorted(name for name, seen in self._seen.items() if seen & gone)
                for name in dropping:
                    self._rebind_due.setdefault(name, now + int(REBIND_DELAY_S[name] * 1e9))
            self.reloads += 1
        summary = {"keys": len(ring), "added": sorted(k.name for k in added),
                   "removed": sorted(k.name for k in removed), "dropping": dropping,
                   "problems": list(ring.problems)}
        self.events.emit("KEYS_RELOADED", logging.WARNING if removed else logging.INFO, key="keys",
                         source=source, keys=len(ring), added=",".join(summary["added"]) or "-",
                         removed=",".join(summary["removed"]) or "-", dropping=",".join(dropping) or "-")
        return summary

    def reload_from_signal(self) -> None:
        """SIGHUP: reload, logging instead of raising (the previous keys stay in force on error)."""
        try:
            self.reload("SIGHUP")
        except SecurityError as exc:
            self.events.emit("KEYS_RELOAD_FAILED", logging.ERROR, key="reload", error=str(exc))

    def keys_reload_command(self) -> dict:
        """The `keys_reload` control command (operator keys only: authorize_control)."""
        try:
            return self.reload("keys_reload")
        except SecurityError as exc:
            self.events.emit("KEYS_RELOAD_FAILED", logging.ERROR, key="reload", error=str(exc))
            raise wire.WireError("REFUSED", f"keys_reload: {exc}; the previous keys stay in force") from None

    def _rebind_if_due(self, socket_name: str, owner) -> None:
        due = self._rebind_due.get(socket_name)
        if due is None or time.monotonic_ns() < due:
            return
        with self._lock:
            self._rebind_due.pop(socket_name, None)
            if not owner.unbound:  # a first attempt, not the retry of one that left the socket unbound
                self._seen[socket_name] = set()  # from now on: whoever authenticates against the new keys
        done = False
        try:
            took_ns = owner.rebind(timeout_s=REBIND_WAIT_S[socket_name])
            done = True
        except BusError as exc:
            unbound = owner.unbound
            self.events.emit("KEYS_REBIND_FAILED", logging.CRITICAL if unbound else logging.ERROR, key=socket_name,
                             socket=socket_name, endpoint=owner.endpoint, unbound=unbound, error=str(exc),
                             message="UNBOUND: no peer can connect to this socket until it is bound again; retrying "
                                     "at every turn of its owner thread" if unbound else
                                     f"its connections stay up; retrying in {REBIND_RETRY_S:g} s")
            return
        finally:
            if not done:  # whatever failed, never forget the retry: an unbound socket stays so until it is done
                retry_s = REBIND_UNBOUND_RETRY_S if owner.unbound else REBIND_RETRY_S
                with self._lock:
                    self._rebind_due.setdefault(socket_name, time.monotonic_ns() + int(retry_s * 1e9))
        self.rebinds[socket_name] += 1
        self.last_rebind_ms[socket_name] = took_ns / 1e6
        self.last_rebind_at_ns[socket_name] = time.monotonic_ns()  # when the connections were dropped
        self.events.emit("KEYS_REVOKED_DISCONNECT", logging.WARNING, key=socket_name,
                         socket=socket_name, endpoint=owner.endpoint, rebind_ms=took_ns / 1e6,
                         message="dropped every connection of this socket; authorized peers reconnect")

    def _report_problems(self, ring: KeyRing) -> None:
        for problem in ring.problems:
            self.events.emit("KEY_FILE_IGNORED", logging.ERROR, key=problem[:120], problem=problem)

    def snapshot(self) -> dict:
        """Plain counters and state for status and metrics."""
        return {"keys": len(self._ring), "allow": self.allowlist.entries, "refusals": dict(self.refusals),
                "accepted": dict(self.accepted), "forbidden": dict(self.forbidden), "rebinds": dict(self.rebinds),
                "last_rebind_ms": dict(self.last_rebind_ms), "reloads": self.reloads}


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "?"


def server_for(cfg, ctx: zmq.Context, events: EventLog | None = None) -> ServerSecurity | None:
    """The running ServerSecurity for an aggregator config, or None when security is not enabled."""
    if not cfg.security.enabled:
        return None
    return ServerSecurity(cfg, ctx, events).start()


def bus_options(security: ServerSecurity | None, socket_name: str) -> dict:
    """Keyword arguments for an aggregator bus socket: {} without security."""
    return {} if security is None else security.bus_options(socket_name)
