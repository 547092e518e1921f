"""`v2grt prequal`: the grid operator's prequalification tests, run on the live system (docs/prequal.md).

``sequence`` (pure): each service's tests as frequency programmes with their source rule;
``criteria`` (pure): the checks, on measured power; ``rig`` (shell): meter, inverters, gateway and
aggregator processes driven by the test signal, the journal read back; ``report``: JSON, table, PNGs;
``cli``: the command.
"""

from v2grt.prequal.cli import add_parser
from v2grt.prequal.criteria import Check, evaluate, required_kw
from v2grt.prequal.sequence import SERVICES, TestSpec, sequence

__all__ = ["SERVICES", "Check", "TestSpec", "add_parser", "evaluate", "required_kw", "sequence"]
