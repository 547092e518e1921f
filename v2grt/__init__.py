"""v2grt: a real-time dispatcher for vehicle-to-grid fleets."""

from v2grt.kernel import default_backend as _default_backend
from v2grt.kernel import get_backend as _get_backend

# A real-time service must not silently run the slow twin: without the compiled kernel, importing
# v2grt fails with how to build it, unless V2GRT_BACKEND=reference asks for the twin.
_get_backend(_default_backend())

from v2grt.codes import Reason  # noqa: E402
from v2grt.dispatch import Dispatcher, DispatchResult  # noqa: E402
from v2grt.fleet import Fleet, FleetError  # noqa: E402
from v2grt.profile import DispatchProfile, ProfileError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DispatchProfile", "DispatchResult", "Dispatcher", "Fleet", "FleetError", "ProfileError", "Reason"]
