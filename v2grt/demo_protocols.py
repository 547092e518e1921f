"""The demo's fleet behind several protocols: which vehicles each drives, and the files each side needs.

``sim``: ``--gateways`` processes of ``v2grt gateway sim``, as the demo always ran. ``ocpp``: one
``v2grt gateway ocpp`` (a CSMS on 127.0.0.1) and one ``v2grt sim ocpp-stations`` process with
stations of two EVSEs. ``sunspec``: one ``v2grt gateway sunspec`` and one ``v2grt sim
sunspec-chargers`` process with ten chargers (unit ids) per Modbus TCP port. Each non-sim protocol
has a site (and a site inverter) of its own, as a depot would.

The OCPP side is set up as an operator must (docs/gateways.md, security profile 2): a TLS
certificate and key (self-signed here, key mode 0600), a credentials file of password hashes for
the gateway and the stations' passwords for the simulator. The gateway would run without TLS only
with ``--allow-plaintext``, which is for labs; the demo shows the real set-up instead, and TLS on
loopback costs little (one handshake per station at start).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from v2grt.fleet import COLUMNS, Fleet

PROTOCOLS = ("sim", "ocpp", "sunspec")
OCPP_GATEWAY, SUNSPEC_GATEWAY = "ocpp1", "sunspec1"
SITE_OF = {OCPP_GATEWAY: "ocpp-depot", SUNSPEC_GATEWAY: "sunspec-depot"}
EVSES_PER_STATION = 2
UNITS_PER_SERVER = 10
#: Stations that misbehave on purpose (the first ones), as a real site has: one refuses every charging
#: profile (NODE_UNREACHABLE), one speaks only OCPP 2.0.1 (charge-only). Only with enough stations.
OCPP_KINDS = "rejects=1,v201=1"
OCPP_KINDS_MIN_STATIONS = 4


def parse_protocols(text: str) -> tuple[str, ...]:
    """``sim,ocpp`` -> ("sim", "ocpp") in the canonical order; ValueError naming what is wrong."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"--protocols {text!r}: expected a comma-separated subset of {','.join(PROTOCOLS)}")
    return tuple(p for p in PROTOCOLS if p in names)


def build_fleet(*, n_sim: int, n_gateways: int, n_ocpp: int, n_sunspec: int, seed: int) -> Fleet:
    """The demo's fleet: ``Fleet.random`` behind the sim gateways (exactly today's demo when alone), then
    the OCPP EVSEs (``CS0001:1``, ``CS0001:2``, ...) and SunSpec chargers (``SS0001``, ...), each
    protocol at a site of its own, their ratings and state drawn by ``Fleet.random`` from ``seed + 1``."""
    from v2grt.gateway import ocpp_mapping as om

    fleet = Fleet.random(n_sim, seed=seed, n_gateways=n_gateways, n_sites=n_gateways) if n_sim else Fleet()
    extra = Fleet.random(n_ocpp + n_sunspec, seed=seed + 1, n_gateways=1, n_sites=1)
    ids = [om.node_id(f"CS{i // EVSES_PER_STATION + 1:04d}", i % EVSES_PER_STATION + 1) for i in range(n_ocpp)]
    ids += [f"SS{i + 1:04d}" for i in range(n_sunspec)]
    for r, nid in enumerate(ids):
        gw = OCPP_GATEWAY if r < n_ocpp else SUNSPEC_GATEWAY
        fleet.add(nid, gw, SITE_OF[gw], **{c.name: getattr(extra, c.name)[r].item() for c in COLUMNS})
    return fleet


def self_signed_tls(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (its own CA, one day) and its private key (mode 0600) in ``directory``."""
    from v2grt.testing import self_signed_cert

    return self_signed_cert(directory, host, common_name="v2grt-demo-csms")


@dataclasses.dataclass
class DeviceSide:
    """One non-sim protocol's two processes: its gateway and its simulated devices (``v2grt`` argv)."""

    protocol: str
    gateway_id: str
    gateway_argv: list[str]
    devices_argv: list[str]
    #: devices the gateway must reach (command once) before the demo starts the aggregator
    reachable: int


def ocpp_side(directory: Path, fleet: Fleet, roster: Path, *, port: int, seed: int, gateway_args: list[str],
              devices_args: list[str]) -> DeviceSide:
    """Certificate, credentials and passwords in ``directory``; the gateway listens on 127.0.0.1:``port``."""
    from v2grt.sim.ocpp_stations import write_site

    rows = fleet.gateway_rows(OCPP_GATEWAY)
    stations = -(-len(rows) // EVSES_PER_STATION)
    paths = write_site(directory, n_stations=stations, evses_per_station=EVSES_PER_STATION, gateway_id=OCPP_GATEWAY,
                       seed=seed)
    paths["roster"].unlink()  # its roster is write_site's own; the demo's roster has these stations' rows
    cert, key = self_signed_tls(directory)
    online = fleet.online[rows] == 1
    kinds = OCPP_KINDS if stations >= OCPP_KINDS_MIN_STATIONS else ""
    # the "rejects" station is the first one: its EVSEs never take a profile
    reachable = int(online.sum()) - (int(online[:EVSES_PER_STATION].sum()) if kinds else 0)
    gateway = ["gateway", "ocpp", "--roster", str(roster), "--gateway-id", OCPP_GATEWAY, "--credentials",
               str(paths["credentials"]), "--tls-cert", str(cert), "--tls-key", str(key),
               "--listen", f"127.0.0.1:{port}", *gateway_args]
    devices = ["sim", "ocpp-stations", "--url", f"wss://127.0.0.1:{port}/ocpp", "--roster", str(roster),
               "--gateway-id", OCPP_GATEWAY, "--passwords", str(paths["passwords"]), "--ca-cert", str(cert),
               "--seed", str(seed), *(["--kinds", kinds] if kinds else []), *devices_args]
    return DeviceSide("ocpp", OCPP_GATEWAY, gateway, devices, reachable)


def sunspec_side(directory: Path, fleet: Fleet, roster: Path, *, ports: list[int], seed: int,
                 gateway_args: list[str], devices_args: list[str]) -> DeviceSide:
    """The devices file in ``directory``: UNITS_PER_SERVER chargers per port of ``ports`` on 127.0.0.1."""
    from v2grt.gateway import sunspec_mapping as sm

    rows = fleet.gateway_rows(SUNSPEC_GATEWAY)
    directory.mkdir(parents=True, exist_ok=True)
    devices = directory / "devices.csv"
    sm.write_devices(devices, {fleet.node_ids[r]: sm.DeviceAddress("127.0.0.1", ports[k // UNITS_PER_SERVER],
                                                                   k % UNITS_PER_SERVER + 1)
                               for k, r in enumerate(rows.tolist())})
    gateway = ["gateway", "sunspec", "--roster", str(roster), "--gateway-id", SUNSPEC_GATEWAY, "--devices",
               str(devices), *gateway_args]
    sims = ["sim", "sunspec-chargers", "--roster", str(roster), "--devices", str(devices), "--gateway-id",
            SUNSPEC_GATEWAY, "--seed", str(seed), *devices_args]
    return DeviceSide("sunspec", SUNSPEC_GATEWAY, gateway, sims, len(rows))


def sunspec_servers(n_chargers: int) -> int:
    """Modbus TCP ports the SunSpec chargers need."""
    return -(-n_chargers // UNITS_PER_SERVER)


__all__ = ["EVSES_PER_STATION", "OCPP_GATEWAY", "PROTOCOLS", "SITE_OF", "SUNSPEC_GATEWAY", "DeviceSide",
           "build_fleet", "ocpp_side", "parse_protocols", "self_signed_tls", "sunspec_servers", "sunspec_side"]
