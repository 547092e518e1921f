"""The client side of the secured bus (gateways, v2g-cli, other control systems): ``curve=`` options from
key files, and a whole system's keys on one machine for the demo (``provision_local``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

from v2grt.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    authorize_key,
    generate_keypair,
    load_secret_key,
    read_key_file,
)

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
