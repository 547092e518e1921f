"""The compiled OCPP schema checks (v2grt.gateway.ocpp_schema) against the `ocpp` package's own jsonschema checks."""

from __future__ import annotations

import copy

import pytest
from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallResult, _validate_payload

from v2grt.gateway import ocpp_schema

METER = {"evseId": 1, "meterValue": [{"timestamp": "2026-12-05T00:00:00.000Z", "sampledValue": [
    {"measurand": "SoC", "value": 55.2, "unitOfMeasure": {"unit": "Percent"}},
    {"measurand": "Power.Active.Export", "value": 8800.0}]}]}


def _bad_meter(change):
    p = copy.deepcopy(METER)
    change(p)
    return p


REQUESTS = [
    ("2.1", "MeterValues", METER),
    ("2.1", "MeterValues", _bad_meter(lambda p: p.update(evseId="1"))),  # type
    ("2.1", "MeterValues", _bad_meter(lambda p: p.pop("meterValue"))),  # required
    ("2.1", "MeterValues", _bad_meter(lambda p: p.update(extra=1))),  # additionalProperties
    ("2.1", "MeterValues", _bad_meter(lambda p: p["meterValue"][0]["sampledValue"][0].update(measurand="Nope"))),
    ("2.1", "MeterValues", _bad_meter(lambda p: p.update(meterValue=[]))),  # minItems
    ("2.1", "MeterValues", _bad_meter(lambda p: p["meterValue"][0].update(timestamp="not a time"))),  # format
    ("2.1", "BootNotification", {"reason": "PowerUp", "chargingStation": {"model": "m" * 21, "vendorName": "v"}}),
    ("2.1", "BootNotification", {"reason": "PowerUp", "chargingStation": {"model": "m", "vendorName": "v"}}),
    ("2.0.1", "StatusNotification", {"timestamp": "x", "connectorStatus": "Occupied", "evseId": 1,
                                     "connectorId": 1}),
    ("2.0.1", "StatusNotification", {"timestamp": "x", "connectorStatus": "Occupied", "evseId": 1.5,
                                     "connectorId": 1}),
]

RESPONSES = [
    ("2.1", "UpdateDynamicSchedule", {"status": "Accepted"}),
    ("2.1", "UpdateDynamicSchedule", {"status": "Maybe"}),
    ("2.1", "UpdateDynamicSchedule", {}),
    ("2.1", "UpdateDynamicSchedule", {"status": "Accepted", "statusInfo": {"reasonCode": 7}}),
    ("2.1", "SetChargingProfile", {"status": "Rejected", "more": True}),
]


def _verdict(fn) -> str:
    try:
        fn()
    except OCPPError as exc:
        return exc.code
    return "valid"


@pytest.mark.parametrize("version,action,payload", REQUESTS)
def test_a_request_gets_the_verdict_and_code_of_the_ocpp_package(version, action, payload):
    """Each request payload is accepted or refused with the same CALLERROR code as ocpp's jsonschema check."""
    ours = _verdict(lambda: ocpp_schema.validate(version, action, payload))
    theirs = _verdict(lambda: _validate_payload(Call("1", action, copy.deepcopy(payload)), version))
    assert ours == theirs


@pytest.mark.parametrize("version,action,payload", RESPONSES)
def test_a_reply_gets_the_verdict_and_code_of_the_ocpp_package(version, action, payload):
    """Each reply payload is accepted or refused with the same code as ocpp's jsonschema check."""
    ours = _verdict(lambda: ocpp_schema.validate(version, action, payload, response=True))
    theirs = _verdict(lambda: _validate_payload(CallResult("1", copy.deepcopy(payload), action=action), version))
    assert ours == theirs


def test_the_cases_cover_valid_and_every_code():
    """The cases above include valid payloads and each code the mapping can give (so the comparison means something)."""
    codes = {_verdict(lambda v=v, a=a, p=p: ocpp_schema.validate(v, a, p)) for v, a, p in REQUESTS}
    assert {"valid", "TypeConstraintViolation", "ProtocolError", "FormatViolation"} <= codes


def test_an_action_without_a_schema_is_not_implemented():
    """An unknown action, a path-like name or an unknown version raises NotImplemented, never an OSError."""
    for version, action in (("2.1", "NoSuchAction"), ("2.1", "../v16/schemas/Heartbeat"), ("9", "Heartbeat")):
        with pytest.raises(OcppNotImplemented):
            ocpp_schema.validate(version, action, {})


def test_the_gateways_snake_case_keys_are_the_packages_and_bounded():
    """The gateway's remembered key conversion gives ocpp's camel_to_snake_case result, and stops remembering
    keys past its bound (a station can invent keys in customData)."""
    from ocpp.charge_point import camel_to_snake_case

    from v2grt.gateway import ocpp as gw

    payload = {"evseId": 1, "meterValue": [{"sampledValue": [{"unitOfMeasure": {"unit": "W"}}]}],
               "chargingNeeds": {"v2xChargingParameters": {"evMinV2XEnergyRequest": 1, "targetSoC": 80}},
               "customData": {"vendorId": "v", "ocppCSMSURL": "u", "someHTTPThing": [1, {"aB": 2}]}}
    assert gw._snake(payload) == camel_to_snake_case(payload)
    invented = {f"k{i}X": i for i in range(2 * gw._SNAKE_KEYS_MAX)}
    assert gw._snake(invented) == camel_to_snake_case(invented)
    assert len(gw._SNAKE_KEYS) <= gw._SNAKE_KEYS_MAX
