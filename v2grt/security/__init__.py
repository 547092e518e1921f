"""Bus security: CURVE key files, the authorized keys, the ZAP handler (key, role, address), client options.

The rooms: ``keys`` (key files, identities, the authorized keys), ``zap`` (the aggregator side: allowlist,
ZAP handler, per-message checks, reload and revocation), ``client`` (``curve=`` options for bus clients)
and ``cli`` (`v2grt keys` and the clients' ``--client-key``/``--server-key``: the command-line layer,
which imports the others and is not re-exported here). docs/security.md has the threat model.
"""

from v2grt.security.client import LocalKeys, client_curve, client_curve_files, provision_local
from v2grt.security.keys import (
    PUBLIC_SUFFIX,
    ROLES,
    SECRET_SUFFIX,
    AuthorizedKey,
    Identity,
    KeyFile,
    KeyRing,
    SecurityError,
    authorize_key,
    fingerprint,
    generate_keypair,
    load_secret_key,
    read_key_file,
    revoke_key,
)
from v2grt.security.zap import (
    KEY_PROPERTY,
    READ_ONLY_COMMANDS,
    REBIND_DELAY_S,
    SECURITY_EVENT_CODES,
    SOCKET_ROLES,
    ZAP_DOMAIN_PREFIX,
    AddressAllowlist,
    Authenticator,
    ServerSecurity,
    bus_options,
    check_config,
    parse_network,
    server_for,
)

__all__ = [
    "KEY_PROPERTY",
    "PUBLIC_SUFFIX",
    "READ_ONLY_COMMANDS",
    "REBIND_DELAY_S",
    "ROLES",
    "SECRET_SUFFIX",
    "SECURITY_EVENT_CODES",
    "SOCKET_ROLES",
    "ZAP_DOMAIN_PREFIX",
    "AddressAllowlist",
    "Authenticator",
    "AuthorizedKey",
    "Identity",
    "KeyFile",
    "KeyRing",
    "LocalKeys",
    "SecurityError",
    "ServerSecurity",
    "authorize_key",
    "bus_options",
    "check_config",
    "client_curve",
    "client_curve_files",
    "fingerprint",
    "generate_keypair",
    "load_secret_key",
    "parse_network",
    "provision_local",
    "read_key_file",
    "revoke_key",
    "server_for",
]
