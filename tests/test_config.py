"""Tests for v2grt.config: the service section, bus defaults, the setpoint expiry and its checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from v2grt import security
from v2grt.config import BusConfig, ConfigError, build_service, config_from_dict, load_config
from v2grt.io import bus


def _config(service: dict | None):
    """A minimal valid config with this service section (a synthetic fleet, no files)."""
    data = {"fleet": {"random": 10}}
    if service is not None:
        data["service"] = service
    return config_from_dict(data)


CURVE = {"name": "site_fr", "points": [[49.5, 1.0], [49.9, 0.0], [50.1, 0.0], [50.5, -1.0]]}


def test_no_service_section_is_the_default_builtin():
    """Without a service section the aggregator runs GB Dynamic Containment at 50 Hz."""
    curve = build_service(_config(None).service)
    assert (curve.name, curve.nominal_hz) == ("dc", 50.0)


def test_a_curve_without_a_name_selects_the_custom_curve():
    """service.curve alone selects it: no `name: null` needed beside it."""
    cfg = _config({"curve": CURVE})
    assert cfg.service.name is None
    curve = build_service(cfg.service)
    assert curve.name == "site_fr"
    assert curve.fraction_at(49.7) == pytest.approx(0.5)


def test_name_null_beside_a_curve_is_still_accepted():
    """The older spelling (name: null + curve) keeps working."""
    assert build_service(_config({"name": None, "curve": CURVE}).service).name == "site_fr"


def test_a_name_and_a_curve_together_are_refused_naming_both_keys():
    """A built-in name and a custom curve at once is an error naming service.name and service.curve."""
    with pytest.raises(ConfigError, match=r"service\.name='fcr' and service\.curve are both set"):
        _config({"name": "fcr", "curve": CURVE})


def test_a_null_name_without_a_curve_is_refused():
    """name: null with no curve selects nothing, and the message says what to set."""
    with pytest.raises(ConfigError, match=r"service\.name is null and there is no service\.curve"):
        _config({"name": None})


def test_a_bad_custom_curve_is_refused_naming_service_curve():
    """A custom curve's own error is reported under service.curve."""
    with pytest.raises(ConfigError, match=r"service\.curve: .*fraction=2\.0"):
        _config({"curve": {"name": "bad", "points": [[49.5, 2.0], [50.5, -1.0]]}})


def test_nominal_defaults_to_the_curve_s_own():
    """Without service.nominal_hz, ieee1547 runs at its 60 Hz and the others at 50 Hz."""
    assert build_service(_config({"name": "ieee1547"}).service).nominal_hz == 60.0
    assert build_service(_config({"name": "fcr"}).service).nominal_hz == 50.0
    assert build_service(_config({"curve": CURVE}).service).nominal_hz == 50.0


def test_service_nominal_applies_to_builtins_and_custom_curves():
    """service.nominal_hz moves a built-in and a deviation-defined custom curve to that nominal."""
    assert build_service(_config({"name": "fcr", "nominal_hz": 60}).service).fraction_at(59.8) == 1.0
    dev = {"name": "dev", "deviation_points_mhz": [[-200, 1.0], [200, -1.0]]}
    assert build_service(_config({"curve": dev, "nominal_hz": 60}).service).fraction_at(59.8) == 1.0


def test_conflicting_nominals_are_refused_naming_both_keys():
    """curve.nominal_hz 50 with service.nominal_hz 60 is an error, not a silent choice."""
    with pytest.raises(ConfigError, match=r"curve\.nominal_hz=50 differs from service\.nominal_hz=60\.0"):
        _config({"curve": {**CURVE, "nominal_hz": 50}, "nominal_hz": 60})


def test_bus_bind_defaults_agree_in_code_shipped_config_and_docs():
    """One loopback bind default in BusConfig, bus.DEFAULT_*_ENDPOINT, default.yaml, wire.md and operations.md."""
    root = Path(__file__).resolve().parents[1]
    defaults = BusConfig()
    library = {"setpoints": bus.DEFAULT_SETPOINT_ENDPOINT, "telemetry": bus.DEFAULT_TELEMETRY_ENDPOINT,
               "control": bus.DEFAULT_CONTROL_ENDPOINT}
    shipped = yaml.safe_load((root / "configs" / "default.yaml").read_text())["bus"]
    wire_md = (root / "docs" / "wire.md").read_text()
    operations_md = (root / "docs" / "operations.md").read_text()
    for key, endpoint in library.items():
        assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
        assert getattr(defaults, key) == endpoint == shipped[key], key
        assert f"| `bus.{key}` | `{endpoint}` |" in wire_md, key
        assert f"| `{key}` | `{endpoint}` |" in operations_md, key


DEFAULT_YAML = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def config(period_s=0.1, ttl="absent", **extra):
    bus = {} if ttl == "absent" else {"setpoint_ttl_s": ttl}
    return {"period_s": period_s, "budget_s": period_s, "meter": None, "fleet": {"random": 10}, "bus": bus, **extra}


@pytest.mark.parametrize("period_s", [0.02, 0.05, 0.1, 1.0])
@pytest.mark.parametrize("ttl", ["absent", None])
def test_setpoint_expiry_defaults_to_three_periods(period_s, ttl):
    """An absent or null bus.setpoint_ttl_s is 3 x period_s; a set one is used as given."""
    assert config_from_dict(config(period_s, ttl)).setpoint_ttl_s == pytest.approx(3 * period_s)
    assert config_from_dict(config(period_s, 2.5 * period_s)).setpoint_ttl_s == pytest.approx(2.5 * period_s)


def test_shipped_config_derives_its_expiry_from_the_period():
    """configs/default.yaml leaves the expiry to the period: 0.3 s at its 100 ms."""
    cfg = load_config(DEFAULT_YAML)
    assert cfg.bus.setpoint_ttl_s is None and cfg.setpoint_ttl_s == pytest.approx(0.3)


@pytest.mark.parametrize("ttl", [0.1, 0.05])
def test_expiry_not_longer_than_a_period_is_refused(ttl):
    """An expiry of one period or less would expire every setpoint before the next: refused, naming key and value."""
    with pytest.raises(ConfigError, match=rf"bus.setpoint_ttl_s={ttl:g} s is not longer than period_s=0.1 s"):
        config_from_dict(config(0.1, ttl))


def test_derived_expiry_shorter_than_a_revocation_pause_is_refused_with_security(tmp_path):
    """With security on, 3 x 20 ms is shorter than a revocation's pause (2 periods + 100 ms): refused, saying
    the value was derived and what it must be; 3 x 100 ms covers it exactly and is accepted."""
    keys, auth = tmp_path / "keys", tmp_path / "auth"
    security.generate_keypair("aggregator", keys)
    security.generate_keypair("gw1", keys)
    security.authorize_key(keys / "gw1.key", "gateway:gw1", auth)
    sec = {"security": {"enabled": True, "server_secret_key": str(keys / "aggregator.key_secret"),
                        "authorized_keys": str(auth)}}
    with pytest.raises(ConfigError, match=r"bus.setpoint_ttl_s \(unset: 3 x period_s = 0.06\) s is shorter than "
                                          r"the pause .* expected bus.setpoint_ttl_s >= 0.14"):
        config_from_dict(config(0.02, **sec))
    with pytest.raises(ConfigError, match=r"bus.setpoint_ttl_s=0.13 s .* expected bus.setpoint_ttl_s >= 0.14"):
        config_from_dict(config(0.02, 0.13, **sec))
    assert config_from_dict(config(0.02, 0.14, **sec)).setpoint_ttl_s == 0.14
    assert config_from_dict(config(0.1, **sec)).setpoint_ttl_s == pytest.approx(0.3)
    assert config_from_dict(config(0.02)).setpoint_ttl_s == pytest.approx(0.06)  # no security: no pause to cover


@pytest.mark.parametrize("section", ["journal", "ha", "bus", "kernel"])
def test_operations_md_config_reference_has_every_key_with_its_default_and_range(section):
    """docs/operations.md section 5 has a row for each key of the ha, journal, bus and kernel sections, with the code's
    default and validated range."""
    import dataclasses
    import re

    from v2grt import config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    ref = doc[doc.index("## 5. Configuration"):doc.index("## 6. The discharge profile")]
    start = ref.index(f"\n**{section}**")
    block = ref[start:ref.find("\n**", start + 1)]
    rows = {m[1]: (m[2], m[3]) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", block, re.M)}
    cls = {"journal": config.JournalConfig, "ha": config.HAConfig, "bus": config.BusConfig,
           "kernel": config.KernelConfig}[section]

    def g(x):
        return f"{x:g}".replace("e+0", "e").replace("e+", "e")

    for f in dataclasses.fields(cls):
        assert f.name in rows, f"operations.md **{section}** lacks `{f.name}`"
        cell = rows[f.name]  # default, allowed
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        first = cell[0].strip().split()[0].strip("`:")
        if isinstance(default, bool):
            assert first == str(default).lower(), (f.name, cell[0])
        elif isinstance(default, (int, float)):
            assert float(first) == default, (f.name, cell[0])
        elif default is None:
            assert first == "null", (f.name, cell[0])
        elif default == []:
            assert first in ("[]", "required"), (f.name, cell[0])
        else:
            assert first == default, (f.name, cell[0])
        spec = config._RANGES.get(f"{section}.{f.name}")
        if spec is not None and len(spec) == 3:
            assert f"{g(spec[1])}..{g(spec[2])}" in cell[1], (f.name, cell[1], spec)


@pytest.mark.parametrize("threads", [0, 3, 1.5, "2"])
def test_kernel_threads_outside_one_or_two_is_refused_naming_the_key(threads):
    """kernel.threads is 1 or 2: anything else is refused, naming the key and the value."""
    with pytest.raises(ConfigError, match=r"kernel.threads="):
        config_from_dict(config(kernel={"threads": threads}))


def test_kernel_threads_default_to_two_in_code_and_the_shipped_config():
    """Two kernel threads by default (one runs anyway below 50,000 vehicles), as configs/default.yaml says; 1 is
    accepted."""
    assert config_from_dict(config()).kernel.threads == 2
    assert load_config(DEFAULT_YAML).kernel.threads == 2
    assert config_from_dict(config(kernel={"threads": 1})).kernel.threads == 1


def test_meter_poll_lead_defaults_to_2_ms_is_nullable_and_must_be_shorter_than_the_period():
    """meter.poll_lead_s: 2 ms in code and the shipped config, null for free-running polls, refused at a period or
    more (naming key, value and period)."""
    assert config_from_dict({"fleet": {"random": 10}}).meter.poll_lead_s == 0.002
    assert load_config(DEFAULT_YAML).meter.poll_lead_s == 0.002
    assert config_from_dict({"fleet": {"random": 10}, "meter": {"poll_lead_s": None}}).meter.poll_lead_s is None
    with pytest.raises(ConfigError, match=r"meter.poll_lead_s=0.1 is not shorter than period_s=0.1"):
        config_from_dict({"period_s": 0.1, "fleet": {"random": 10}, "meter": {"poll_lead_s": 0.1}})
