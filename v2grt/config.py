"""The aggregator's YAML configuration: loaded, defaulted and validated before anything starts.

Every error names the file, the key path (``meter.poll_interval_s``), the value and what is allowed.
Paths in the file are relative to the file's own directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from v2grt.services import ServiceCurve


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names file, key, value and what is allowed."""


@dataclasses.dataclass
class MeterConfig:
    host: str = "127.0.0.1"
    port: int = 5020
    device_id: int = 1
    poll_interval_s: float = 0.005  # the meter's part of frequency-to-setpoint latency (bench e2e: 20 ms misses)
    # the polls are phase-locked to the cycle deadlines: each period's last poll starts this long before the
    # deadline (about a round trip), so the cycle's sample is ~this old, not 0..poll_interval_s; None: free-running
    poll_lead_s: float | None = 0.002
    timeout_s: float = 0.05
    stale_after_s: float = 1.0  # older frequency: GRID_FREQUENCY_STALE
    on_stale: str = "rampout"  # freeze: hold the last response; rampout: ramp it to 0 over rampout_s
    rampout_s: float = 10.0


@dataclasses.dataclass
class InverterConfig:
    name: str
    site: str
    host: str = "127.0.0.1"
    port: int = 5021
    device_id: int = 1


#: The default setpoint expiry in control periods (bus.setpoint_ttl_s absent or null): how long a gateway
#: holds its last setpoints after the aggregator dies (kill -9, a host crash) before it falls back to 0 kW.
#: Two missed messages are tolerated; the third missing one is the failsafe (DESIGN.md section 12).
SETPOINT_TTL_PERIODS = 3

#: With security enabled a key revocation pauses the setpoints of the gateways that stay: about one period
#: for the message that dropped them, plus ZeroMQ's 100 ms reconnect interval, plus the wait for the next
#: publish (docs/security.md section 4: 197-205 ms measured at 100 ms). The expiry must cover
#: REVOCATION_PAUSE_PERIODS x period_s + REVOCATION_RECONNECT_S, or every revocation stops the fleet.
REVOCATION_PAUSE_PERIODS = 2
REVOCATION_RECONNECT_S = 0.1


@dataclasses.dataclass
class BusConfig:
    setpoints: str = "tcp://127.0.0.1:5560"  # PUB: setpoints and fleet status
    telemetry: str = "tcp://127.0.0.1:5561"  # PULL: gateway telemetry
    telemetry_strict: bool = False  # true: a bad value drops the batch; false: quarantines that vehicle only
    control: str = "tcp://127.0.0.1:5562"  # ROUTER: v2g-cli
    # gateways fall back to 0 kW when nothing newer arrives in this time; None: SETPOINT_TTL_PERIODS x period_s
    setpoint_ttl_s: float | None = None
    setpoint_hwm: int = 4  # messages queued per subscriber before the newest are dropped, not queued
    # share of each period the bus thread may spend receiving (telemetry + control), after the cycle has
    # published; beyond it messages wait in ZeroMQ's queues (v2grt.gate, docs/operations.md)
    receive_budget: float = 0.5
    # true: a publisher thread owns the setpoint PUB and sends each cycle's frames while the control thread
    # sleeps (v2grt.publisher); false: the control thread sends them itself (the fallback, and bench A/B)
    publisher_thread: bool = True


@dataclasses.dataclass
class SecurityConfig:
    enabled: bool = False  # CURVE + ZAP on every bus socket (docs/security.md)
    server_secret_key: str | None = None  # the aggregator's NAME.key_secret (mode 0600; `v2grt keys generate`)
    authorized_keys: str | None = None  # directory of authorized public keys (`v2grt keys authorize`)
    allow: list | None = None  # peer addresses and CIDR ranges that may connect; None: any address


@dataclasses.dataclass
class ServiceConfig:
    # A file that gives `curve` and no `name` selects the custom curve (name becomes None); a file
    # that gives neither gets the default built-in. Both given is an error (config_from_dict).
    name: str | None = "dc"
    curve: dict | None = None  # a custom curve (see v2grt.services.ServiceCurve.from_config)
    capacity_kw: float | None = None  # None: what the fleet can deliver both ways at start
    nominal_hz: float | None = None  # None: the curve's own (60 Hz for ieee1547, else 50 Hz)
    base_kw: float = 0.0


@dataclasses.dataclass
class FleetConfig:
    roster: str | None = None  # CSV path
    random: int | None = None  # or a synthetic fleet of this many vehicles (demos, benchmarks)
    seed: int = 0


@dataclasses.dataclass
class RealtimeSection:
    cpu_affinity: list[int] | None = None
    sched_fifo_priority: int = 0
    mlockall: bool = True
    gc_freeze: bool = True
    switch_interval_s: float = 0.0005


@dataclasses.dataclass
class KernelConfig:
    """The dispatch kernel (docs/architecture.md, "The kernel on two threads")."""

    # 2: pass 1 and the merit fill on the control thread and one worker thread, where that is safe and pays
    # (>= 50,000 vehicles, each site's vehicles one run of rows, the control thread allowed on >= 2 CPUs);
    # 1: the control thread alone
    threads: int = 2


@dataclasses.dataclass
class LogConfig:
    file: str = "/var/log/v2g/engine.log"  # used as a service (--daemonize, systemd); stderr in the foreground
    format: str = "text"  # text, or json (one JSON object per line)
    level: str = "INFO"
    rate_limit_s: float = 60.0  # one line per (code, node) per interval; repeats counted (suppressed=N)
    max_node_lines: int = 20  # per-node lines per monitor pass; the rest in one NODE_EVENTS summary


@dataclasses.dataclass
class AlertConfig:
    band_hz: float | None = 0.2  # GRID_FREQUENCY_ALERT when |f - nominal| exceeds this; null: off
    hysteresis_hz: float = 0.01  # the alert clears inside band_hz - hysteresis_hz
    response_limit: float = 1.0  # |response| cap, fraction of capacity, while in alert (1: no throttle)
    fleet_ramp_kw_per_s: float | None = None  # fleet ramp while in alert (faster); null: the profile's


@dataclasses.dataclass
class MetricsConfig:
    enabled: bool = False  # Prometheus endpoint http://address:port/metrics
    address: str = "127.0.0.1"
    port: int = 9108


@dataclasses.dataclass
class HAConfig:
    """High availability (docs/ha.md): one leader per fleet elected through etcd; absent: no etcd at all."""

    etcd: list[str] = dataclasses.field(default_factory=list)  # etcd client URLs http://host:port (v3 JSON gateway)
    peers: list[str] = dataclasses.field(default_factory=list)  # the other aggregators' control endpoints
    lease_ttl_s: int = 2  # whole seconds (etcd); failover after a crash takes about this long
    name: str | None = None  # this candidate in the leader key; None: hostname:pid
    key_prefix: str = "/v2grt/fleets/"  # the leader key is <key_prefix><fleet_id>/leader
    clock_error: float = 0.01  # bound on our clock's rate error against etcd's (fraction of the TTL)
    margin_s: float | None = None  # kept off the lease's end for the publish itself; None: budget_s
    poll_s: float = 0.05  # how often a standby tries the leader key
    # etcd over TLS (https:// URLs): the CA that signed etcd's certificate (None: the system's CAs), and this
    # aggregator's client certificate and key for etcd's --client-cert-auth (both or neither; key mode 0600)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


@dataclasses.dataclass
class JournalConfig:
    """The dispatch journal (v2grt.journal, docs/journal.md)."""

    enabled: bool = False  # configs/default.yaml ships it on; a config without a journal section has none
    dir: str | None = None  # None: <state_dir>/journal/<fleet_id>
    rotate_s: float = 3600.0  # segment length, aligned to the UTC clock (hourly: hh:00:00)
    flush_interval_s: float = 0.1  # writer pass: what a kill -9 can lose at most (plus one pass)
    fsync_interval_s: float = 1.0  # fsync at least this often: what a host crash can lose at most
    vehicles: bool = True  # per-vehicle setpoint and reported power (changes only)
    vehicle_interval_s: float = 1.0  # every vehicle sampled once per this interval
    max_age_h: float | None = 168.0  # retention by age; None: none
    max_size_gb: float | None = 10.0  # retention by total size of the directory's segments; None: none
    parquet: bool = True  # convert sealed segments to Parquet (pyarrow) in a low-priority child process
    buffer_s: float = 30.0  # the ring: how long the writer may stall before records are dropped (counted)


@dataclasses.dataclass
class Config:
    path: Path | None = None
    fleet_id: str = "default"
    period_s: float = 0.1
    budget_s: float = 0.1
    worker_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    state_dir: str = "/var/lib/v2g"  # durable epoch and the one-scheduler-per-fleet lock
    discharge_profile: str | None = None  # discharge_profile.json; None: the built-in defaults
    realtime: RealtimeSection = dataclasses.field(default_factory=RealtimeSection)
    kernel: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    meter: MeterConfig | None = dataclasses.field(default_factory=MeterConfig)
    inverters: list[InverterConfig] = dataclasses.field(default_factory=list)
    bus: BusConfig = dataclasses.field(default_factory=BusConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)
    fleet: FleetConfig = dataclasses.field(default_factory=FleetConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    alert: AlertConfig = dataclasses.field(default_factory=AlertConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    ha: HAConfig | None = None  # absent: one aggregator, the host-local epoch (v2grt.state)
    journal: JournalConfig = dataclasses.field(default_factory=JournalConfig)

    @property
    def setpoint_ttl_s(self) -> float:
        """The setpoint expiry in force: bus.setpoint_ttl_s, or SETPOINT_TTL_PERIODS x period_s when unset."""
        ttl = self.bus.setpoint_ttl_s
        return SETPOINT_TTL_PERIODS * self.period_s if ttl is None else ttl

    def resolve(self, value: str | None) -> Path | None:
        """A path from the config, relative to the config file's directory."""
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p


# key -> (type, lo, hi) for numbers, or (type, choices) for strings
_RANGES: dict[str, tuple] = {
    "period_s": (float, 0.01, 10.0),
    "budget_s": (float, 0.001, 10.0),
    "worker_threads": (int, 1, 64),
    "realtime.sched_fifo_priority": (int, 0, 99),
    "realtime.switch_interval_s": (float, 0.0, 0.1),
    "kernel.threads": (int, 1, 2),
    "meter.port": (int, 1, 65535),
    "meter.device_id": (int, 0, 247),
    "meter.poll_interval_s": (float, 0.001, 10.0),
    "meter.poll_lead_s": (float, 0.0, 10.0),
    "meter.timeout_s": (float, 0.001, 10.0),
    "meter.stale_after_s": (float, 0.01, 600.0),
    "meter.on_stale": (str, ("freeze", "rampout")),
    "meter.rampout_s": (float, 0.0, 3600.0),
    "inverters[].port": (int, 1, 65535),
    "inverters[].device_id": (int, 0, 247),
    "bus.setpoint_ttl_s": (float, 0.01, 60.0),
    "bus.setpoint_hwm": (int, 1, 100000),
    "bus.receive_budget": (float, 0.05, 1.0),
    "service.capacity_kw": (float, 0.0, 1e9),
    "service.nominal_hz": (float, ("50", "60")),
    "service.base_kw": (float, -1e9, 1e9),
    "fleet.random": (int, 0, 10_000_000),
    "fleet.seed": (int, 0, 2**63 - 1),
    "log.format": (str, ("text", "json")),
    "log.level": (str, ("DEBUG", "INFO", "WARNING", "ERROR")),
    "log.rate_limit_s": (float, 0.0, 86400.0),
    "log.max_node_lines": (int, 0, 10000),
    "alert.band_hz": (float, 0.001, 5.0),
    "alert.hysteresis_hz": (float, 0.0, 1.0),
    "alert.response_limit": (float, 0.0, 1.0),
    "alert.fleet_ramp_kw_per_s": (float, 0.0, 1e12),
    "metrics.port": (int, 0, 65535),
    "ha.lease_ttl_s": (int, 1, 60),
    "ha.clock_error": (float, 0.0, 0.1),
    "ha.margin_s": (float, 0.0, 10.0),
    "ha.poll_s": (float, 0.005, 10.0),
    "journal.rotate_s": (float, 60.0, 86400.0),
    "journal.flush_interval_s": (float, 0.01, 1.0),
    "journal.fsync_interval_s": (float, 0.01, 1.0),
    "journal.vehicle_interval_s": (float, 0.01, 60.0),
    "journal.max_age_h": (float, 0.01, 1e6),
    "journal.max_size_gb": (float, 0.001, 1e6),
    "journal.buffer_s": (float, 1.0, 600.0),
}

_SECTIONS = {"realtime": RealtimeSection, "kernel": KernelConfig, "meter": MeterConfig, "bus": BusConfig,
             "service": ServiceConfig, "fleet": FleetConfig, "log": LogConfig, "alert": AlertConfig,
             "metrics": MetricsConfig, "security": SecurityConfig, "journal": JournalConfig}


def load_config(path: str | Path) -> Config:
    """Read, default and validate a YAML config; raises ConfigError naming file, key and value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return config_from_dict(data, path)


def config_from_dict(data: dict, path: Path | None = None) -> Config:
    src = str(path) if path else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: expected a mapping of keys at the top level, got {type(data).__name__}")
    top_fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "path"}
    _unknown(src, "", data, top_fields)
    cfg = Config(path=path)
    for key, value in data.items():
        if key in _SECTIONS:
            if key == "meter" and value is None:
                cfg.meter = None
                continue
            setattr(cfg, key, _section(src, key, _SECTIONS[key], value))
            if key == "service" and isinstance(value, dict) and value.get("curve") is not None:
                _custom_curve_selects_itself(src, cfg.service, value)
        elif key == "inverters":
            cfg.inverters = _inverters(src, value)
        elif key == "ha":
            cfg.ha = None if value is None else _ha(src, value)
        else:
            setattr(cfg, key, _value(src, key, value, top_fields[key].type))
    _check(src, cfg)
    return cfg


def _unknown(src, prefix, data, fields):
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{src}: unknown key(s) {[prefix + k for k in unknown]}; allowed under "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}")


def _section(src, name, cls, value):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {name} must be a mapping of keys, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _unknown(src, name + ".", value, fields)
    obj = cls()
    for key, v in value.items():
        setattr(obj, key, _value(src, f"{name}.{key}", v, fields[key].type))
    return obj


def _custom_curve_selects_itself(src, svc: ServiceConfig, value: dict) -> None:
    """service.curve without service.name selects the custom curve; with a built-in name it is an error.

    The built-in default (name: dc) must not make a custom curve need `name: null` to be heard, and a
    file naming both must not have one of them silently ignored.
    """
    if "name" not in value:
        svc.name = None
    elif svc.name is not None:
        raise ConfigError(f"{src}: service.name={svc.name!r} and service.curve are both set; set one: "
                          "service.name for a built-in curve, or service.curve (without service.name) "
                          "for a custom one")


def build_service(svc: ServiceConfig) -> ServiceCurve:
    """The v2grt.services.ServiceCurve a service section selects; raises ServiceError naming what is wrong.

    A built-in at ``svc.nominal_hz`` (None: the service's own), or the custom ``svc.curve``. The
    curve's own ``nominal_hz`` and ``service.nominal_hz`` must agree when both are given.
    """
    from v2grt.services import ServiceCurve, ServiceError, get_service

    if svc.name is not None:
        return get_service(svc.name, svc.nominal_hz)
    curve = dict(svc.curve)
    own = curve.get("nominal_hz")
    if svc.nominal_hz is not None:
        if own is not None and own != svc.nominal_hz:
            raise ServiceError(f"curve.nominal_hz={own!r} differs from service.nominal_hz={svc.nominal_hz!r}; "
                               "give the nominal once (either key)")
        curve["nominal_hz"] = svc.nominal_hz
    return ServiceCurve.from_config(curve)


def _inverters(src, value):
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{src}: inverters must be a list of mappings (name, site, host, port, device_id)")
    out, names = [], set()
    fields = {f.name: f for f in dataclasses.fields(InverterConfig)}
    for i, item in enumerate(value):
        key = f"inverters[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{src}: {key} must be a mapping, got {item!r}")
        _unknown(src, key + ".", item, fields)
        for required in ("name", "site"):
            if not isinstance(item.get(required), str) or not item[required]:
                raise ConfigError(f"{src}: {key}.{required} is required (a non-empty string)")
        inv = InverterConfig(name=item["name"], site=item["site"])
        for k, v in item.items():
            setattr(inv, k, _value(src, f"{key}.{k}", v, fields[k].type, range_key=f"inverters[].{k}"))
        if inv.name in names:
            raise ConfigError(f"{src}: {key}.name={inv.name!r} is used twice; inverter names must be unique")
        names.add(inv.name)
        out.append(inv)
    return out


def _ha(src, value) -> HAConfig:
    """The ha section: etcd URLs required, peers a list of ZeroMQ endpoints, numbers in range."""
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: ha must be a mapping of keys (etcd, peers, lease_ttl_s, ...), got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(HAConfig)}
    _unknown(src, "ha.", value, fields)
    ha = HAConfig()
    for key, v in value.items():
        if key in ("etcd", "peers"):
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{src}: ha.{key}={v!r} must be a list of non-empty strings")
            setattr(ha, key, v)
        else:
            setattr(ha, key, _value(src, f"ha.{key}", v, fields[key].type))
    if not ha.etcd:
        raise ConfigError(f"{src}: ha.etcd is required: a list of etcd client URLs (http(s)://host:port), e.g. "
                          "['http://10.0.0.5:2379']")
    for i, url in enumerate(ha.etcd):
        if not re.fullmatch(r"https?://[^/:\s]+:\d{1,5}/?", url):
            raise ConfigError(f"{src}: ha.etcd[{i}]={url!r} is not an etcd client URL; expected http://host:port "
                              "or https://host:port (etcd's v3 JSON gateway)")
    schemes = {url.split(":", 1)[0] for url in ha.etcd}
    if len(schemes) > 1:
        raise ConfigError(f"{src}: ha.etcd={ha.etcd!r} mixes http:// and https://; expected one scheme for every "
                          "member of the cluster")
    tls_keys = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(ha, k) is not None]
    if tls_keys and schemes == {"http"}:
        raise ConfigError(f"{src}: ha.{tls_keys[0]} is set but ha.etcd uses http://; expected https:// URLs for "
                          "etcd over TLS (or no tls_* keys)")
    if (ha.tls_cert_file is None) != (ha.tls_key_file is None):
        given, missing = ("tls_cert_file", "tls_key_file") if ha.tls_key_file is None else ("tls_key_file",
                                                                                         "tls_cert_file")
        raise ConfigError(f"{src}: ha.{given} is set without ha.{missing}; a client certificate needs both")
    for i, ep in enumerate(ha.peers):
        if not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"{src}: ha.peers[{i}]={ep!r} must be a peer aggregator's control endpoint "
                              "(tcp://host:port or ipc://path)")
    if not ha.key_prefix.startswith("/") or not ha.key_prefix.endswith("/"):
        raise ConfigError(f"{src}: ha.key_prefix={ha.key_prefix!r} must start and end with '/' "
                          "(the leader key is <key_prefix><fleet_id>/leader)")
    return ha


def _check_ha(src, cfg: Config) -> None:
    """The lease must leave at least two periods of surely valid time after clock_error and margin_s; the TLS
    files must be readable files, the private key not readable by group or others."""
    ha = cfg.ha
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(ha, key)
        if value is None:
            continue
        path = cfg.resolve(value)
        try:
            st = path.stat()
            path.open("rb").close()
        except OSError as exc:
            raise ConfigError(f"{src}: ha.{key}={value!r}: cannot read {path} ({exc.strerror}); expected a PEM "
                              "file") from None
        if key == "tls_key_file" and st.st_mode & 0o077:
            raise ConfigError(f"{src}: ha.{key}={value!r}: {path} has mode {st.st_mode & 0o777:04o}; a private key "
                              "must be readable by its owner only (chmod 0600)")
    margin_s = cfg.budget_s if ha.margin_s is None else ha.margin_s
    usable_s = ha.lease_ttl_s * (1.0 - ha.clock_error) - margin_s
    if usable_s < 2 * cfg.period_s:
        raise ConfigError(f"{src}: ha.lease_ttl_s={ha.lease_ttl_s} leaves {usable_s:.3f} s of surely valid lease "
                          f"after ha.clock_error={ha.clock_error:g} and ha.margin_s={margin_s:g} s; expected at "
                          f"least 2 x period_s = {2 * cfg.period_s:g} s (raise lease_ttl_s or lower margin_s)")


def _value(src, key, value, annotation, range_key=None):
    spec = _RANGES.get(range_key or key)
    ann = str(annotation)
    if spec:
        kind = spec[0]
        if kind is str:
            if value not in spec[1]:
                raise ConfigError(f"{src}: {key}={value!r} not allowed; expected one of {list(spec[1])}")
            return value
        if value is None and "None" in ann:
            return None
        not_number = isinstance(value, bool) or not isinstance(value, (int, float))
        if not_number or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"{src}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}")
        if len(spec) == 2:  # a set of allowed numbers
            if str(int(value)) not in spec[1] or value != int(value):
                raise ConfigError(f"{src}: {key}={value!r} not allowed; expected one of {list(spec[1])}")
            return float(value)
        lo, hi = spec[1], spec[2]
        if not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{src}: {key}={value!r} outside {lo}..{hi}")
        return kind(value)
    if "bool" in ann and "None" not in ann:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key}={value!r} must be true or false")
        return value
    if "list[int]" in ann:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in value):
            raise ConfigError(f"{src}: {key}={value!r} must be a list of CPU numbers (integers >= 0)")
        return value
    if "dict" in ann:
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{src}: {key} must be a mapping, got {value!r}")
        return value
    if "str" in ann:
        if value is None and "None" in ann:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{src}: {key}={value!r} must be a non-empty string")
        return value
    return value


def _check_setpoint_ttl(src, cfg: Config) -> None:
    """The expiry (set or derived) outlasts one period and, with security on, a revocation's pause."""
    ttl = cfg.setpoint_ttl_s
    shown = (f"bus.setpoint_ttl_s={ttl:g}" if cfg.bus.setpoint_ttl_s is not None else
             f"bus.setpoint_ttl_s (unset: {SETPOINT_TTL_PERIODS} x period_s = {ttl:g})")
    if not ttl > cfg.period_s:
        raise ConfigError(f"{src}: {shown} s is not longer than period_s={cfg.period_s:g} s: every setpoint "
                          "would expire before the next one arrives; expected more than period_s "
                          f"(default {SETPOINT_TTL_PERIODS} x period_s)")
    if cfg.security.enabled:
        pause_s = REVOCATION_PAUSE_PERIODS * cfg.period_s + REVOCATION_RECONNECT_S
        if ttl < pause_s - 1e-9:  # equal is enough: 300 ms covers the 205 ms measured at 100 ms
            raise ConfigError(
                f"{src}: {shown} s is shorter than the pause a key revocation causes the gateways that stay "
                f"({REVOCATION_PAUSE_PERIODS} x period_s + {REVOCATION_RECONNECT_S:g} s = {pause_s:g} s, "
                "docs/security.md section 4): with security.enabled every revocation would bring the fleet to "
                f"0 kW; expected bus.setpoint_ttl_s >= {pause_s:g}")


def _check(src, cfg: Config) -> None:
    """Rules across keys."""
    if cfg.budget_s > cfg.period_s:
        raise ConfigError(f"{src}: budget_s={cfg.budget_s} exceeds period_s={cfg.period_s}; the budget is the "
                          "part of the period a cycle may use")
    if cfg.meter is not None and cfg.meter.poll_lead_s is not None and cfg.meter.poll_lead_s >= cfg.period_s:
        raise ConfigError(f"{src}: meter.poll_lead_s={cfg.meter.poll_lead_s:g} is not shorter than period_s="
                          f"{cfg.period_s:g}: the last poll of a period starts this long before the cycle's deadline; "
                          "expected about the meter's round trip (default 0.002), or null for free-running polls")
    if cfg.alert.band_hz is not None and cfg.alert.hysteresis_hz >= cfg.alert.band_hz:
        raise ConfigError(f"{src}: alert.hysteresis_hz={cfg.alert.hysteresis_hz} must be below alert.band_hz="
                          f"{cfg.alert.band_hz}: the alert clears inside band_hz - hysteresis_hz")
    if (cfg.fleet.roster is None) == (cfg.fleet.random is None):
        raise ConfigError(f"{src}: fleet: set exactly one of fleet.roster (a CSV path) or fleet.random (a count)")
    if cfg.service.name is None and cfg.service.curve is None:
        raise ConfigError(f"{src}: service.name is null and there is no service.curve: set service.name to a "
                          "built-in curve (docs/services.md) or give a custom service.curve")
    for ep_key in ("setpoints", "telemetry", "control"):
        ep = getattr(cfg.bus, ep_key)
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"{src}: bus.{ep_key}={ep!r} must be a ZeroMQ endpoint (tcp://host:port or ipc://path)")
    _check_setpoint_ttl(src, cfg)
    if cfg.ha is not None:
        _check_ha(src, cfg)
    if cfg.fleet.roster is not None and not cfg.resolve(cfg.fleet.roster).exists():
        raise ConfigError(f"{src}: fleet.roster={cfg.fleet.roster!r}: no such file ({cfg.resolve(cfg.fleet.roster)})")
    if cfg.discharge_profile is not None and not cfg.resolve(cfg.discharge_profile).exists():
        raise ConfigError(f"{src}: discharge_profile={cfg.discharge_profile!r}: no such file "
                          f"({cfg.resolve(cfg.discharge_profile)})")
    from v2grt.services import ServiceError

    try:
        build_service(cfg.service)
    except ServiceError as exc:
        key = "service.name" if cfg.service.name is not None else "service.curve"
        raise ConfigError(f"{src}: {key}: {exc}") from None
    if cfg.security.enabled or cfg.security.allow is not None:
        from v2grt.security import check_config

        check_config(src, cfg)  # key files present, secret key mode 0600, allow entries valid
    if cfg.discharge_profile is not None:
        from v2grt.profile import DispatchProfile, ProfileError

        try:
            DispatchProfile.from_json(cfg.resolve(cfg.discharge_profile))
        except ProfileError as exc:
            raise ConfigError(f"{src}: discharge_profile: {exc}") from None
