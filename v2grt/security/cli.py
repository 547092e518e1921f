"""`v2grt keys` and the bus clients' ``--client-key``/``--server-key`` options: the command-line layer over
v2grt.security's core (which never imports this module)."""

from __future__ import annotations

import os
from pathlib import Path

from v2grt.security.client import client_curve_files
from v2grt.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    KeyRing,
    SecurityError,
    authorize_key,
    fingerprint,
    generate_keypair,
    read_key_file,
    revoke_key,
)

ENV_AUTHORIZED_KEYS = "V2GRT_AUTHORIZED_KEYS"
ENV_CLIENT_KEY = "V2GRT_CLIENT_KEY"
ENV_SERVER_KEY = "V2GRT_SERVER_KEY"


def add_client_key_options(parser) -> None:
    """Add --client-key and --server-key (defaults from $V2GRT_CLIENT_KEY and $V2GRT_SERVER_KEY) to a parser."""
    g = parser.add_argument_group("bus security (when the aggregator has security.enabled)")
    g.add_argument("--client-key", metavar="FILE", default=os.environ.get(ENV_CLIENT_KEY),
                   help=f"your secret key file, NAME{SECRET_SUFFIX}, mode 0600 (default ${ENV_CLIENT_KEY})")
    g.add_argument("--server-key", metavar="FILE", default=os.environ.get(ENV_SERVER_KEY),
                   help=f"the aggregator's public key file, e.g. aggregator{PUBLIC_SUFFIX} "
                        f"(default ${ENV_SERVER_KEY}); a gateway of several aggregators: one file per aggregator, "
                        "comma-separated, in the order of its endpoints")


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
        files = [f for f in str(server).split(",")]
        curve = client_curve_files(client, files[0])
        if len(files) > 1:  # a gateway of an HA fleet: the i-th key is the i-th aggregator's (docs/wire.md 2.1)
            curve["server_key"] = tuple(read_key_file(f).public_key for f in files)
        return curve
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
    from v2grt.operator import _session  # the same --endpoint/--config/--timeout as every control client

    with _session(args) as session:
        r = session.call("keys_reload")
    print(f"reloaded: {r['keys']} key(s); added {r['added'] or 'none'}; removed {r['removed'] or 'none'}; "
          f"dropping connections on {r['dropping'] or 'no socket'}")
    for problem in r.get("problems", []):
        print(f"  IGNORED: {problem}")
    return 0


def add_parser(sub) -> None:
    """Register `v2grt keys` (the CLI's plugin convention)."""
    from v2grt.operator import _client_options

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
    _client_options(q)  # --endpoint, --config, --timeout, --client-key, --server-key as v2g-cli
    q.set_defaults(func=cmd_reload)
