"""`v2grt backtest`: the live dispatcher over a measured frequency trace in simulated time, journaled and scored."""

from v2grt.backtest.delay import DelayModel, ramp_phase
from v2grt.backtest.engine import DEFAULT_DELAY_S, DEFAULT_RAMP_S, Backtest, BacktestError, Result, Settings
from v2grt.backtest.plugs import PlugPattern, Segment, Sessions, sessions

__all__ = ["DEFAULT_DELAY_S", "DEFAULT_RAMP_S", "Backtest", "BacktestError", "DelayModel", "PlugPattern", "Result",
           "Segment", "Sessions", "Settings", "ramp_phase", "sessions"]
