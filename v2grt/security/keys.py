"""CURVE key files and the authorized keys: identities (``role:name``), key pairs, the key ring.

Key files are the czmq/pyzmq certificate format (``zmq.auth.load_certificate`` reads them):
``NAME.key`` holds the public key, ``NAME.key_secret`` the pair and is mode 0600.
"""

from __future__ import annotations

import dataclasses
import datetime
import grp
import os
import pwd
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import zmq
from zmq.utils import z85

from v2grt.config import ConfigError
from v2grt.io import wire

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: Roles a key can be authorized as, with the name that follows the colon: a gateway id, a person or
#: a system. observer is read-only (fleet status), for SCADA and dashboards.
ROLES = ("gateway", "operator", "observer")
#: Roles that may open a connection to each aggregator socket at all (the ZAP domain names the socket).


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

        SecurityError, and no keys at all, if the directory cannot be read, or if it or any key file in it
        could be changed by someone other than root or this process's user (check_keys_folder): whoever
        can write a key file there chooses its identity, operator included. On a reload the caller then
        keeps its previous ring.
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
        check_keys_folder(directory, files)
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


def check_keys_folder(directory: Path, files: Iterable[Path]) -> None:
    """SecurityError naming the first of ``directory`` and ``files`` that is writable by group or others or owned
    by anyone but root or this process's user (the service account), with its mode, owner and the fix.

    The folder decides who is an operator: an attack run showed a key dropped into a 0777 folder by
    `nobody` loaded at start as ``operator:evil`` and its e-stop accepted. A file that vanished or
    dangles is left to the caller (reported as a problem, not trusted).
    """
    owners = {0, os.geteuid()}
    for path, kind, fix_mode in ((directory, "folder", "755"), *((f, "key file", "644") for f in files)):
        try:
            st = path.stat()
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o022 and st.st_uid in owners:
            continue
        why = ("writable by group or others" if mode & 0o022 else
               f"owned by {_user_name(st.st_uid)}, not root or the service account ({_user_name(os.geteuid())})")
        raise SecurityError(f"security.authorized_keys: {kind} {path} has mode {mode:04o}, owner "
                            f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}: {why}, so others could authorize "
                            f"themselves (as operator too); refusing to load any key. Fix: `chown root:root {path} && "
                            f"chmod {fix_mode} {path}`, then check every key in it with `v2grt keys list --dir "
                            f"{directory}` before starting or reloading")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _authorized_entry(path: Path) -> AuthorizedKey:
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
