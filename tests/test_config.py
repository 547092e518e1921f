"""The aggregator's configuration: the setpoint expiry's default and the rules it is checked against."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2grt import security
from v2grt.config import ConfigError, config_from_dict, load_config

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
