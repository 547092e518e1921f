"""What the OCPP gateway's tests share: a site of stations on disk, TLS contexts, the gateway on loopback, and
the Basic auth header a station sends."""

from __future__ import annotations

import ssl

from v2grt.bench._ocpp_attack import basic
from v2grt.fleet import Fleet
from v2grt.gateway import ocpp_mapping as om
from v2grt.gateway.ocpp import OcppSettings, OcppVehicles, server_ssl_context
from v2grt.gateway.sim import gateway_fleet
from v2grt.sim.ocpp_stations import load_passwords, write_site
from v2grt.testing import self_signed_cert

GW = "ocpp1"


def make_site(directory, n_stations: int, evses_per_station: int = 2):
    """``n_stations`` stations of ``evses_per_station`` EVSEs under gateway ocpp1: (paths of roster,
    credentials (hashes) and passwords (plain), the gateway's fleet, the passwords)."""
    paths = write_site(directory / "site", n_stations=n_stations, evses_per_station=evses_per_station,
                       gateway_id=GW)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), GW)
    return paths, fleet, load_passwords(paths["passwords"])


def tls_contexts(directory):
    """A self-signed certificate for 127.0.0.1 in ``directory``: (its server context, a client context trusting it)."""
    cert_path, key_path = self_signed_cert(directory)
    return server_ssl_context(str(cert_path), str(key_path)), ssl.create_default_context(cafile=str(cert_path))


def start_gateway(paths, fleet, tls_pair=None, **overrides) -> OcppVehicles:
    """The gateway on 127.0.0.1 (an ephemeral port unless ``port`` is given), TLS with ``tls_pair`` else plaintext."""
    settings = OcppSettings(om.load_credentials(paths["credentials"]), host="127.0.0.1",
                            ssl_context=tls_pair[0] if tls_pair else None, allow_plaintext=tls_pair is None,
                            **{"port": 0, **overrides})
    return OcppVehicles(fleet, settings, gateway_id=GW).start()


def auth_header(station: str, password: str) -> dict:
    """The HTTP Basic Authorization header of ``station``."""
    return {"Authorization": basic(station, password)}


def expect_switching_protocols(sock):
    """Read the gateway's answer to an upgrade sent on raw socket ``sock`` up to its blank line, assert it is
    101 Switching Protocols (not a close, not a refusal); the socket, its frames next."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"the gateway closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
