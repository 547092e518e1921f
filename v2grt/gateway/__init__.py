"""Reference gateways: the protocol core every gateway shares, and the simulated-fleet gateway."""

from v2grt.gateway.core import GatewayCore, GatewayError, Vehicles
from v2grt.gateway.sim import SimVehicles, gateway_fleet

__all__ = ["GatewayCore", "GatewayError", "SimVehicles", "Vehicles", "gateway_fleet"]
