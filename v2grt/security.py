"""Bus security: CURVE key files, the authorized keys, the ZAP handler (key, role, address) and `v2grt keys`.

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

Key files are the czmq/pyzmq certificate format (``zmq.auth.load_certificate`` reads them):
``NAME.key`` holds the public key, ``NAME.key_secret`` the pair and is mode 0600.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import ipaddress
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from v2grt.config import ConfigError
from v2grt.events import EventLog
from v2grt.io import wire
from v2grt.io.bus import BusError

log = logging.getLogger("v2grt.security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: Roles a key can be authorized as, with the name that follows the colon: a gateway id, a person or
#: a system. observer is read-only (fleet status), for SCADA and dashboards.
ROLES = ("gateway", "operator", "observer")
#: Roles that may open a connection to each aggregator socket at all (the ZAP domain names the socket).
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
#: A revocation drops a socket's connections this long after the reload: the control socket waits so the
#: reply to `keys_reload` leaves first; the others drop at their owner thread's next turn.
REBIND_DELAY_S = {"setpoints": 0.0, "telemetry": 0.0, "control": 0.1}
REBIND_RETRY_S = 1.0
ENV_AUTHORIZED_KEYS = "V2GRT_AUTHORIZED_KEYS"
ENV_CLIENT_KEY = "V2GRT_CLIENT_KEY"
ENV_SERVER_KEY = "V2GRT_SERVER_KEY"


class SecurityError(ConfigError):
    """A key file, key directory or security setting that cannot be used; names the file and what to do.

    A ConfigError, so `v2grt run` exits 2 (invalid input) with the message on stderr.
    """


# ---------------------------------------------------------------------------------------------------
# identities and key files


@dataclasses.dataclass(frozen=True)
class Identity:
    """``role:name``: ``gateway:<gateway id>``, ``operator:<name>`` or ``observer:<name>``."""

    role: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Identity:
        role, sep, name = str(text).partition(":")
        if not sep or role not in ROLES:
            raise ValueError(f"identity {text!r}: expected ROLE:NAME with ROLE one of {list(ROLES)} "
                             "(e.g. gateway:gw3, operator:alice)")
        if not wire._valid_id(name):
            raise ValueError(f"identity {text!r}: the name must be 1 to {wire.MAX_ID_CHARS} printable characters "
                             "without spaces (for a gateway: its gateway id)")
        return cls(role, name)

    def __str__(self) -> str:
        return f"{self.role}:{self.name}"


@dataclasses.dataclass(frozen=True)
class KeyFile:
    """One certificate file: the public key (z85 bytes), the secret key when present, its metadata."""

    path: Path
    public_key: bytes
    secret_key: bytes | None
    metadata: dict[str, str]


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key in logs and listings (its first 12 z85 characters)."""
    return public_key[:12].decode("ascii", "replace")


def read_key_file(path: str | os.PathLike) -> KeyFile:
    """Parse a czmq/pyzmq certificate (``metadata`` and ``curve`` sections); SecurityError names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"{path}: cannot read key file ({getattr(exc, 'strerror', None) or exc})") from None
    section, meta, keys = None, {}, {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[:1].isspace():
            section = line
            continue
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip().strip("\"'")
        (keys if section == "curve" else meta)[name.strip()] = value
    public, secret = keys.get("public-key", "").encode(), keys.get("secret-key", "").encode() or None
    for what, key in (("public-key", public), ("secret-key", secret)):
        if key is not None and not _is_z85_key(key):
            raise SecurityError(f"{path}: {what} is not a 40-character Z85 CURVE key; is this a key file made by "
                                "`v2grt keys generate`?")
    if not public and secret:
        public = zmq.curve_public(secret)
    if not public:
        raise SecurityError(f"{path}: no public-key in a 'curve' section; is this a key file made by "
                            "`v2grt keys generate`?")
    if secret and zmq.curve_public(secret) != public:
        raise SecurityError(f"{path}: the public-key does not belong to the secret-key; the file was edited: "
                            "generate a new pair")
    return KeyFile(path, public, secret, meta)


def _is_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError):
        return False


def _cert_text(public: bytes, secret: bytes | None, metadata: Mapping[str, str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    kind = ("ZeroMQ CURVE **Secret** Certificate\n#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
            "permissions (0600)." if secret else "ZeroMQ CURVE Public Certificate")
    lines = [f"#   ****  Generated on {now} by v2grt  ****", f"#   {kind}", "", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the first byte (no window where a secret is readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise SecurityError(f"{path} exists; refusing to overwrite a key (pass --force to replace it)") from None
    try:
        os.fchmod(fd, mode)  # O_TRUNC keeps an existing file's mode; the umask may have removed bits
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(name: str, directory: str | os.PathLike = ".", *, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (pair, 0600) into ``directory``; their paths.

    Equivalent to ``zmq.auth.create_certificates``, whose secret file is created world-readable under a
    usual umask and only then could be chmod-ed; here the secret file never exists with another mode.
    """
    if not wire._valid_id(name) or "/" in name or name.startswith("."):
        raise SecurityError(f"key name {name!r}: expected 1 to {wire.MAX_ID_CHARS} printable characters without "
                            "spaces or '/', not starting with '.'")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not force:
        for p in (public_path, secret_path):
            if p.exists():
                raise SecurityError(f"{p} exists; refusing to overwrite a key (pass --force to replace it)")
    _write_new(secret_path, _cert_text(public, secret, {"name": name}), 0o600, force)
    _write_new(public_path, _cert_text(public, None, {"name": name}), 0o644, force)
    return public_path, secret_path


def load_secret_key(path: str | os.PathLike, what: str = "secret key") -> KeyFile:
    """A secret key file, refused unless it is a regular file that only its owner can read or write."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecurityError(f"{what}: {path} does not exist; create the key pair with `v2grt keys generate NAME "
                            f"--dir {path.parent}` (or fix the path)") from None
    except OSError as exc:
        raise SecurityError(f"{what}: {path}: cannot stat ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecurityError(f"{what}: {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecurityError(f"{what}: {path} has mode {mode:04o}: it is readable or writable by group or others; "
                            f"run `chmod 600 {path}` (owner: the service account), and generate a new pair if "
                            "others may have copied it")
    key = read_key_file(path)
    if key.secret_key is None:
        raise SecurityError(f"{what}: {path} holds no secret-key; point at the NAME{SECRET_SUFFIX} file, "
                            f"not NAME{PUBLIC_SUFFIX}")
    return key


# ---------------------------------------------------------------------------------------------------
# the authorized keys


@dataclasses.dataclass(frozen=True)
class AuthorizedKey:
    name: str  # the file's stem: what `v2grt keys revoke NAME` takes
    identity: Identity
    public_key: bytes  # z85
    path: Path

    def topic_allowed(self, topic: bytes) -> bool:
        """May this key subscribe to ``topic`` on the setpoint PUB?"""
        if self.identity.role == "operator":
            return True
        if topic == wire.STATUS_TOPIC:
            return True
        return self.identity.role == "gateway" and topic == wire.setpoint_topic(self.identity.name)


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """The authorized keys at one moment: immutable, swapped whole on reload."""

    by_public: dict[bytes, AuthorizedKey]
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.by_public)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> KeyRing:
        """Every ``*.key`` of ``directory`` with an ``identity``; bad files are skipped and listed in problems.

        SecurityError if the directory itself cannot be read (the caller keeps its previous ring).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise SecurityError(f"security.authorized_keys: {directory} is not a directory; create it and add keys "
                                "with `v2grt keys authorize FILE --as ROLE:NAME --dir "
                                f"{directory}`")
        keys: dict[bytes, AuthorizedKey] = {}
        problems = []
        try:
            files = sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))
        except OSError as exc:
            raise SecurityError(f"security.authorized_keys: {directory}: cannot list ({exc.strerror})") from None
        for path in files:
            try:
                entry = _authorized_entry(path)
            except (SecurityError, ValueError) as exc:
                problems.append(str(exc))
                continue
            except OSError as exc:  # a dangling symlink, a file removed meanwhile, no permission
                problems.append(f"{path}: cannot read ({exc.strerror}); ignored")
                continue
            if entry.public_key in keys:
                other = keys[entry.public_key]
                problems.append(f"{path}: same public key as {other.path.name}; ignored (revoke one of them)")
                continue
            keys[entry.public_key] = entry
        return cls(keys, tuple(problems))


def _authorized_entry(path: Path) -> AuthorizedKey:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise SecurityError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
                            f"could authorize themselves; ignored until `chmod 644 {path}`")
    key = read_key_file(path)
    if key.secret_key is not None:
        raise SecurityError(f"{path}: holds a secret key; the authorized-keys directory takes public keys only; "
                            "ignored (remove it and authorize NAME.key)")
    text = key.metadata.get("identity")
    if text is None:
        raise SecurityError(f"{path}: no 'identity' in its metadata; add keys with `v2grt keys authorize FILE "
                            "--as ROLE:NAME`")
    try:
        identity = Identity.parse(text)
    except ValueError as exc:
        raise SecurityError(f"{path}: {exc}") from None
    return AuthorizedKey(path.name[: -len(PUBLIC_SUFFIX)], identity, key.public_key, path)


def authorize_key(source: str | os.PathLike, identity: str, directory: str | os.PathLike, *,
                  name: str | None = None, force: bool = False) -> AuthorizedKey:
    """Copy the public key of ``source`` into ``directory`` as NAME.key with ``identity``; the new entry."""
    source = Path(source)
    ident = Identity.parse(identity)
    key = read_key_file(source)
    if key.secret_key is not None:
        raise SecurityError(f"{source} holds a secret key: authorize its public half "
                            f"({source.name.removesuffix(SECRET_SUFFIX)}{PUBLIC_SUFFIX}) instead; a secret key "
                            "never leaves the machine it was generated on")
    stem = source.name.removesuffix(PUBLIC_SUFFIX) if name is None else name
    if not wire._valid_id(stem) or "/" in stem or stem.startswith("."):
        raise SecurityError(f"key name {stem!r}: expected printable characters without spaces or '/' (use --name)")
    directory = Path(directory)
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    if directory.is_dir():
        for other in KeyRing.load(directory).by_public.values():
            if other.public_key == key.public_key and (other.name != stem or not force):
                raise SecurityError(f"{source}: this public key is already authorized as {other.name!r} "
                                    f"({other.identity}); revoke that first")
    target = directory / f"{stem}{PUBLIC_SUFFIX}"
    meta = {"name": stem, "identity": str(ident),
            "authorized": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": str(source.resolve())}
    _write_new(target, _cert_text(key.public_key, None, meta), 0o644, force)
    return _authorized_entry(target)


def revoke_key(name: str, directory: str | os.PathLike) -> Path:
    """Move NAME.key out of ``directory`` into its ``revoked/`` subdirectory (kept for audit); the new path."""
    directory = Path(directory)
    path = directory / f"{name}{PUBLIC_SUFFIX}"
    if "/" in name or not path.is_file():
        known = sorted(k.name for k in KeyRing.load(directory).by_public.values()) if directory.is_dir() else []
        raise SecurityError(f"no authorized key named {name!r} in {directory}; authorized: {known or 'none'} "
                            "(see `v2grt keys list`)")
    revoked = directory / "revoked"
    revoked.mkdir(mode=0o755, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = revoked / f"{name}.{stamp}{PUBLIC_SUFFIX}"
    os.replace(path, target)
    return target


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
            self._rebind_if_due("setpoints", agg.publisher)

    def bus_tick(self, telemetry, control) -> None:
        """Bus-thread hook (owner of the telemetry PULL and control ROUTER): drop connections if revoked."""
        if self._rebind_due:
            self._rebind_if_due("telemetry", telemetry)
            self._rebind_if_due("control", control)

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
            self._seen[socket_name] = set()  # from now on: whoever authenticates against the new keys
        try:
            took_ns = owner.rebind()
        except BusError as exc:
            with self._lock:
                self._rebind_due[socket_name] = time.monotonic_ns() + int(REBIND_RETRY_S * 1e9)
            self.events.emit("KEYS_REBIND_FAILED", logging.ERROR, key=socket_name, socket=socket_name,
                             error=str(exc), message="retrying in 1 s")
            return
        self.rebinds[socket_name] += 1
        self.last_rebind_ms[socket_name] = took_ns / 1e6
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


# ---------------------------------------------------------------------------------------------------
# the client side (gateways, v2g-cli, other control systems)


def client_curve_files(secret_key_file: str | os.PathLike, server_public_key_file: str | os.PathLike) -> dict:
    """The ``curve=`` mapping for a bus client: its own key pair file and the aggregator's public key file."""
    own = load_secret_key(secret_key_file, "client secret key")
    server = read_key_file(server_public_key_file)
    return {"server_key": server.public_key, "public_key": own.public_key, "secret_key": own.secret_key}


def client_curve(keys_dir: str | os.PathLike, name: str, server_public_key_file: str | os.PathLike) -> dict:
    """``client_curve_files(keys_dir/NAME.key_secret, server_public_key_file)``."""
    return client_curve_files(Path(keys_dir) / f"{name}{SECRET_SUFFIX}", server_public_key_file)


@dataclasses.dataclass(frozen=True)
class LocalKeys:
    """The keys of a whole system on one machine (provision_local): paths, config section, client options."""

    directory: Path

    @property
    def server_public(self) -> Path:
        return self.directory / f"aggregator{PUBLIC_SUFFIX}"

    def config_section(self) -> dict:
        """The aggregator's `security` config section: these keys, peers from the loopback address only."""
        return {"enabled": True, "server_secret_key": str(self.directory / f"aggregator{SECRET_SUFFIX}"),
                "authorized_keys": str(self.directory / "authorized"), "allow": ["127.0.0.1/32", "::1/128"]}

    def client_args(self, name: str) -> list[str]:
        """``--client-key``/``--server-key`` for a `v2grt` client process using key NAME."""
        return ["--client-key", str(self.directory / f"{name}{SECRET_SUFFIX}"), "--server-key", str(self.server_public)]

    def curve(self, name: str) -> dict:
        return client_curve(self.directory, name, self.server_public)


def provision_local(directory: str | os.PathLike, gateway_ids: Iterable[str], *, operators: Iterable[str] = (),
                    observers: Iterable[str] = ("demo-view",)) -> LocalKeys:
    """Fresh key pairs in ``directory`` for the aggregator, each gateway (as gateway:<id>) and each operator
    and observer, all authorized in ``directory/authorized`` (the demo; a field deployment generates each
    pair on its own machine instead). Replaces keys a previous run left there."""
    directory = Path(directory)
    auth = directory / "authorized"
    if auth.is_dir():
        for old in auth.glob(f"*{PUBLIC_SUFFIX}"):
            old.unlink()
    generate_keypair("aggregator", directory, force=True)
    for role, names in (("gateway", gateway_ids), ("operator", operators), ("observer", observers)):
        for name in names:
            generate_keypair(name, directory, force=True)
            authorize_key(directory / f"{name}{PUBLIC_SUFFIX}", f"{role}:{name}", auth, force=True)
    return LocalKeys(directory)


def add_client_key_options(parser) -> None:
    """Add --client-key and --server-key (defaults from $V2GRT_CLIENT_KEY and $V2GRT_SERVER_KEY) to a parser."""
    g = parser.add_argument_group("bus security (when the aggregator has security.enabled)")
    g.add_argument("--client-key", metavar="FILE", default=os.environ.get(ENV_CLIENT_KEY),
                   help=f"your secret key file, NAME{SECRET_SUFFIX}, mode 0600 (default ${ENV_CLIENT_KEY})")
    g.add_argument("--server-key", metavar="FILE", default=os.environ.get(ENV_SERVER_KEY),
                   help=f"the aggregator's public key file, e.g. aggregator{PUBLIC_SUFFIX} (default ${ENV_SERVER_KEY})")


def client_curve_from_args(args) -> dict | None:
    """The ``curve=`` mapping from add_client_key_options' arguments; None when neither is given.

    Raises v2grt.cli.CliError (exit 2) naming the file and what to do.
    """
    from v2grt.cli import CliError

    client, server = getattr(args, "client_key", None), getattr(args, "server_key", None)
    if not client and not server:
        return None
    if not client or not server:
        missing = "--client-key" if not client else "--server-key"
        raise CliError(f"{missing} is missing: a secured bus needs both your secret key file (--client-key "
                       f"NAME{SECRET_SUFFIX}) and the aggregator's public key file (--server-key aggregator.key)")
    try:
        return client_curve_files(client, server)
    except SecurityError as exc:
        raise CliError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------
# `v2grt keys`


def _authorized_dir(args) -> Path:
    """--dir, else the config's security.authorized_keys, else $V2GRT_AUTHORIZED_KEYS, else ./authorized_keys."""
    if args.dir:
        return Path(args.dir)
    if args.config:
        import yaml

        from v2grt.cli import CliError

        try:
            data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
            value = (data.get("security") or {}).get("authorized_keys")
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise CliError(f"--config {args.config}: cannot read security.authorized_keys ({exc})") from None
        if not value:
            raise CliError(f"--config {args.config}: security.authorized_keys is not set; pass --dir")
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(args.config).parent / p
    return Path(os.environ.get(ENV_AUTHORIZED_KEYS) or "authorized_keys")


def _cli(fn):
    def run(args) -> int:
        from v2grt.cli import CliError

        try:
            return fn(args)
        except SecurityError as exc:
            raise CliError(str(exc)) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
        except OSError as exc:
            raise CliError(f"{exc.filename or ''}: {exc.strerror or exc}", 1) from None
    run.__doc__ = fn.__doc__
    return run


@_cli
def cmd_generate(args) -> int:
    """Generate a CURVE key pair: NAME.key (public) and NAME.key_secret (mode 0600) in DIR."""
    public, secret = generate_keypair(args.name, args.dir, force=args.force)
    key = read_key_file(public)
    print(f"generated key pair {args.name!r} (public key {fingerprint(key.public_key)}...)")
    print(f"  public  {public}   give this file to the aggregator's administrator:")
    print(f"          v2grt keys authorize {public.name} --as gateway:<id> | operator:<name> | observer:<name>")
    print(f"  secret  {secret}   mode 0600; it never leaves this machine")
    return 0


@_cli
def cmd_authorize(args) -> int:
    """Authorize a public key file as ROLE:NAME (copied into the authorized-keys directory)."""
    directory = _authorized_dir(args)
    entry = authorize_key(args.file, args.identity, directory, name=args.name, force=args.force)
    print(f"authorized {entry.name!r} as {entry.identity} ({fingerprint(entry.public_key)}...) in {entry.path}")
    print("apply it: `systemctl reload v2grt` (SIGHUP) or `v2grt keys reload`")
    return 0


@_cli
def cmd_revoke(args) -> int:
    """Revoke an authorized key by name (moved to DIR/revoked/); reload to drop its connections."""
    directory = _authorized_dir(args)
    target = revoke_key(args.name, directory)
    print(f"revoked {args.name!r}: moved to {target}")
    print("apply it now: `systemctl reload v2grt` (SIGHUP) or `v2grt keys reload`; the aggregator then drops "
          "the key's live connections")
    return 0


@_cli
def cmd_list(args) -> int:
    """List the authorized keys: name, identity, public key fingerprint, file."""
    import json

    directory = _authorized_dir(args)
    ring = KeyRing.load(directory)
    rows = sorted(ring.by_public.values(), key=lambda k: (k.identity.role, k.identity.name, k.name))
    if args.json:
        print(json.dumps({"directory": str(directory), "problems": list(ring.problems),
                          "keys": [{"name": k.name, "identity": str(k.identity), "public_key": k.public_key.decode(),
                                    "file": str(k.path)} for k in rows]}, indent=2))
        return 0
    print(f"{len(rows)} authorized key(s) in {directory}")
    width = max([len(k.name) for k in rows] + [4])
    for k in rows:
        print(f"  {k.name:<{width}}  {k.identity!s:<28}  {fingerprint(k.public_key)}...")
    for problem in ring.problems:
        print(f"  IGNORED: {problem}")
    return 0


def cmd_reload(args) -> int:
    """Ask a running aggregator to re-read its authorized keys (operator key required when secured)."""
    from v2grt.cli import CliError
    from v2grt.io import bus

    curve = client_curve_from_args(args)
    ctx = zmq.Context()
    try:
        with bus.ControlClient(ctx, args.control, timeout_ms=args.timeout_ms, curve=curve) as cli:
            reply = cli.call("keys_reload")
    except wire.WireError as exc:
        raise CliError(str(exc), 1) from None
    finally:
        ctx.term()
    if not reply.ok:
        raise CliError(f"{reply.error_code}: {reply.error_message}", 3 if reply.error_code == "FORBIDDEN" else 1)
    r = reply.result
    print(f"reloaded: {r['keys']} key(s); added {r['added'] or 'none'}; removed {r['removed'] or 'none'}; "
          f"dropping connections on {r['dropping'] or 'no socket'}")
    for problem in r.get("problems", []):
        print(f"  IGNORED: {problem}")
    return 0


def add_parser(sub) -> None:
    """Register `v2grt keys` (the CLI's plugin convention)."""
    from v2grt.io import bus

    p = sub.add_parser("keys", help="CURVE keys for the secured bus: generate, authorize, revoke, list, reload",
                       description="Key management for security.enabled (docs/security.md).")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def dir_options(q):
        q.add_argument("--dir", help="the authorized-keys directory (default: --config's security.authorized_keys, "
                                     f"else ${ENV_AUTHORIZED_KEYS}, else ./authorized_keys)")
        q.add_argument("--config", help="take the directory from this aggregator config")

    q = ks.add_parser("generate", help="generate a key pair NAME.key + NAME.key_secret",
                      description=cmd_generate.__doc__)
    q.add_argument("name", metavar="NAME")
    q.add_argument("--dir", default=".", help="where to write the files (default: the current directory)")
    q.add_argument("--force", action="store_true", help="replace existing files of that name")
    q.set_defaults(func=cmd_generate)

    q = ks.add_parser("authorize", help="authorize a public key as gateway:ID, operator:NAME or observer:NAME",
                      description=cmd_authorize.__doc__)
    q.add_argument("file", metavar="FILE", help="the peer's public key file NAME.key")
    q.add_argument("--as", dest="identity", required=True, metavar="ROLE:NAME",
                   help="gateway:<gateway id> | operator:<name> | observer:<name>")
    q.add_argument("--name", help="key name in the directory (default: FILE's name without .key)")
    q.add_argument("--force", action="store_true", help="replace an authorized key of that name")
    dir_options(q)
    q.set_defaults(func=cmd_authorize)

    q = ks.add_parser("revoke", help="revoke an authorized key by name", description=cmd_revoke.__doc__)
    q.add_argument("name", metavar="NAME")
    dir_options(q)
    q.set_defaults(func=cmd_revoke)

    q = ks.add_parser("list", help="list the authorized keys", description=cmd_list.__doc__)
    q.add_argument("--json", action="store_true")
    dir_options(q)
    q.set_defaults(func=cmd_list)

    q = ks.add_parser("reload", help="make a running aggregator re-read its authorized keys",
                      description=cmd_reload.__doc__)
    q.add_argument("--control", default=bus.DEFAULT_CONTROL_CONNECT, help="the aggregator's control endpoint")
    q.add_argument("--timeout-ms", type=int, default=2000)
    add_client_key_options(q)
    q.set_defaults(func=cmd_reload)


__all__ = [
    "AddressAllowlist",
    "Authenticator",
    "AuthorizedKey",
    "Identity",
    "KeyFile",
    "KeyRing",
    "LocalKeys",
    "SecurityError",
    "ServerSecurity",
    "add_client_key_options",
    "authorize_key",
    "bus_options",
    "check_config",
    "client_curve",
    "client_curve_files",
    "client_curve_from_args",
    "fingerprint",
    "generate_keypair",
    "load_secret_key",
    "provision_local",
    "read_key_file",
    "revoke_key",
    "server_for",
]
