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


# ------------------------------------------------------------------------------- MeterValues' plain check
TS = "2026-12-05T00:00:00.000Z"


def _mv(*samples, **extra) -> dict:
    return {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": list(samples)}], **extra}


def _sv(**kw) -> dict:
    return {"measurand": "Power.Active.Export", "value": 7400.0, **kw}


#: every constraint of the MeterValues request schema, each on both sides of its line; valid payloads the plain
#: check takes, valid ones it leaves to the compiled check, and invalid ones (all left to it)
METER_CORPUS = [
    METER, _mv(_sv()), _mv({"value": 1}), _mv(_sv(value=-3)), _mv(_sv(value=0.5)),
    _mv(_sv(phase="L1-N"), _sv(phase="L2-N", context="Sample.Periodic", location="Outlet")),
    _mv(_sv(unitOfMeasure={"unit": "kW", "multiplier": -3})), _mv(_sv(unitOfMeasure={})),
    _mv(_sv(unitOfMeasure={"unit": "u" * 20})), _mv(_sv(unitOfMeasure={"unit": "u" * 21})),
    _mv(_sv(unitOfMeasure={"unit": 5})), _mv(_sv(unitOfMeasure={"multiplier": 1.5})),
    _mv(_sv(unitOfMeasure={"multiplier": True})), _mv(_sv(unitOfMeasure={"multiplier": "1"})),
    _mv(_sv(unitOfMeasure={"unit": "W", "bogus": 1})), _mv(_sv(unitOfMeasure="W")),
    _mv(_sv(unitOfMeasure={"unit": "W", "customData": {"vendorId": "v"}})),
    _mv(_sv(unitOfMeasure={"customData": {}})),
    _mv(_sv(value="1")), _mv(_sv(value=True)), _mv(_sv(value=None)), _mv({"measurand": "SoC"}),
    _mv(_sv(measurand="Nope")), _mv(_sv(measurand=5)), _mv(_sv(measurand="Power.Active.Setpoint")),
    _mv(_sv(measurand="Display.PresentSOC")), _mv(_sv(context="Nope")), _mv(_sv(phase="L4")),
    _mv(_sv(location="Moon")), _mv(_sv(bogus=1)), _mv(_sv(customData={"vendorId": "v", "more": [1]})),
    _mv(_sv(customData={"vendorId": "v" * 256})), _mv(_sv(customData={"vendorId": 7})),
    _mv(_sv(signedMeterValue={"signedMeterData": "abc", "encodingMethod": "OCMF"})),
    _mv(_sv(signedMeterValue={"signedMeterData": "abc", "encodingMethod": "OCMF", "signingMethod": "s",
                              "publicKey": "k"})),
    _mv(_sv(signedMeterValue={"signedMeterData": "abc"})), _mv(_sv(signedMeterValue={"encodingMethod": "e" * 51,
                                                                                      "signedMeterData": "a"})),
    _mv(_sv(), customData={"vendorId": "v"}), _mv(_sv(), customData={}), _mv(_sv(), bogus=1),
    {"evseId": 1}, {"meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]}, {},
    {"evseId": 0, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]},
    {"evseId": -1, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]},
    {"evseId": 1.0, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]},
    {"evseId": True, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]},
    {"evseId": "1", "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]}]},
    {"evseId": 1, "meterValue": []}, {"evseId": 1, "meterValue": {"timestamp": TS, "sampledValue": [_sv()]}},
    {"evseId": 1, "meterValue": ["x"]}, {"evseId": 1, "meterValue": [{"sampledValue": [_sv()]}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS}]}, {"evseId": 1, "meterValue": [{"timestamp": 5,
                                                                                     "sampledValue": [_sv()]}]},
    {"evseId": 1, "meterValue": [{"timestamp": "yesterday", "sampledValue": [_sv()]}]},  # formats not enforced
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": []}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": _sv()}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": ["x"]}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()], "customData": {"vendorId": "v"}}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()], "bogus": 1}]},
    {"evseId": 1, "meterValue": [{"timestamp": TS, "sampledValue": [_sv()]},
                                 {"timestamp": TS, "sampledValue": [_sv(value="x")]}]},
    [], "x", None,
]


def _package(version, payload) -> str:
    return _verdict(lambda: _validate_payload(Call("1", "MeterValues", copy.deepcopy(payload)), version))


def _same_as_the_package(version, payload) -> None:
    """check_meter_values gives the compiled check's verdict and code (the gateway's before the plain check), and
    the package's verdict. (Codes are compared with the package's for single faults above: with two faults in
    one payload jsonschema and fastjsonschema may name different ones first.)"""
    plain = ocpp_schema.plain_meter_values(version)
    theirs = _package(version, payload)
    if plain(payload):
        assert theirs == "valid", payload  # the plain check never takes what the schema refuses
    ours = _verdict(lambda: ocpp_schema.check_meter_values(version, copy.deepcopy(payload)))
    compiled = _verdict(lambda: ocpp_schema.validate(version, "MeterValues", copy.deepcopy(payload)))
    assert ours == compiled, payload
    assert (ours == "valid") == (theirs == "valid"), payload


@pytest.mark.parametrize("version", ["2.1", "2.0.1"])
def test_meter_values_get_the_verdict_and_code_of_the_ocpp_package_on_the_corpus(version):
    """Every payload of the corpus gets the ocpp package's verdict and CALLERROR code from check_meter_values, and
    the plain check accepts only payloads the package's schema accepts."""
    for payload in METER_CORPUS:
        _same_as_the_package(version, payload)


def test_the_meter_corpus_covers_the_plain_check_the_full_check_and_every_code():
    """The corpus has payloads the plain check takes, valid ones it leaves to the compiled check, and each code."""
    plain = ocpp_schema.plain_meter_values("2.1")
    kinds = {("plain" if plain(p) else _package("2.1", p)) for p in METER_CORPUS}
    assert {"plain", "valid", "TypeConstraintViolation", "ProtocolError", "FormatViolation"} <= kinds


@pytest.mark.parametrize("version", ["2.1", "2.0.1"])
def test_the_plain_check_is_built_for_both_versions_and_takes_what_stations_send(version):
    """The fast path is on for the installed `ocpp` package's schemas and takes the simulated stations' payload
    (built from the schema: a schema whose shape it does not know turns it off, and this fails)."""
    assert ocpp_schema.plain_meter_values(version) is not None
    assert ocpp_schema.check_meter_values(version, METER) is True


def test_a_schema_with_an_unknown_constraint_turns_the_plain_check_off():
    """A keyword the plain check does not enforce (a maximum on evseId, maxItems, a new required field) leaves
    every payload to the compiled check."""
    base = ocpp_schema._load("2.1", "MeterValuesRequest")
    assert ocpp_schema._plain_meter_values(copy.deepcopy(base)) is not None
    for change in (lambda s: s["properties"]["evseId"].update(maximum=9),
                   lambda s: s["properties"]["meterValue"].update(maxItems=2),
                   lambda s: s["definitions"]["SampledValueType"]["required"].append("measurand"),
                   lambda s: s["definitions"]["SampledValueType"]["properties"]["value"].update(minimum=0),
                   lambda s: s["definitions"]["UnitOfMeasureType"].update(additionalProperties=True),
                   lambda s: s["definitions"]["PhaseEnumType"].pop("enum")):
        schema = copy.deepcopy(base)
        change(schema)
        assert ocpp_schema._plain_meter_values(schema) is None


#: replies to the gateway's CALLs: bare statuses (the plain check), statuses with more, and broken ones
REPLY_ACTIONS = [("2.1", "UpdateDynamicSchedule"), ("2.1", "SetChargingProfile"), ("2.1", "TriggerMessage"),
                 ("2.0.1", "SetChargingProfile"), ("2.0.1", "TriggerMessage")]
REPLY_CORPUS = [
    {"status": "Accepted"}, {"status": "Rejected"}, {"status": "NotImplemented"}, {"status": "Maybe"},
    {"status": "accepted"}, {"status": 1}, {"status": None}, {"status": True}, {"status": ["Accepted"]}, {},
    {"status": "Accepted", "statusInfo": {"reasonCode": "x"}}, {"status": "Accepted", "statusInfo": {}},
    {"status": "Accepted", "statusInfo": {"reasonCode": "r" * 21}}, {"status": "Rejected", "more": True},
    {"status": "Accepted", "customData": {"vendorId": "v"}}, {"status": "Accepted", "customData": {}},
    {"Status": "Accepted"}, [], "Accepted", None,
]


@pytest.mark.parametrize("version,action", REPLY_ACTIONS)
def test_replies_get_the_compiled_checks_code_and_the_packages_verdict(version, action, monkeypatch):
    """Every reply of the corpus gets from validate the code it got from the compiled check alone and the ocpp
    package's verdict; the plain status check is built for each and takes only replies the schema accepts."""
    plain = ocpp_schema.plain_status_reply(version, action)
    assert plain is not None and plain({"status": "Accepted"})

    def codes(payload) -> tuple[str, str]:
        return (_verdict(lambda: ocpp_schema.validate(version, action, copy.deepcopy(payload), response=True)),
                _verdict(lambda: _validate_payload(CallResult("1", copy.deepcopy(payload), action=action), version)))

    ours = {i: codes(p) for i, p in enumerate(REPLY_CORPUS)}
    monkeypatch.setitem(ocpp_schema._plain_replies, (version, action), None)  # the compiled check alone
    before = {i: codes(p)[0] for i, p in enumerate(REPLY_CORPUS)}
    for i, payload in enumerate(REPLY_CORPUS):
        assert ours[i][0] == before[i], payload
        assert (ours[i][0] == "valid") == (ours[i][1] == "valid"), payload
        assert not plain(payload) or ours[i][1] == "valid", payload
    assert {"valid", "FormatViolation", "TypeConstraintViolation", "ProtocolError"} <= set(before.values())


def test_a_reply_schema_that_requires_more_than_a_status_has_no_plain_check():
    """A reply whose schema requires more than the status (or has none) takes the compiled check alone."""
    assert ocpp_schema.plain_status_reply("2.1", "BootNotification") is None  # requires currentTime, interval
    schema = ocpp_schema._load("2.1", "UpdateDynamicScheduleResponse")
    assert ocpp_schema._plain_status(copy.deepcopy(schema)) is not None
    schema["required"].append("statusInfo")
    assert ocpp_schema._plain_status(schema) is None


def _meter_payloads(plain_only: bool = False):
    """MeterValues payloads near the schema's lines (most fields right, some wrong, some missing or extra); with
    ``plain_only``, payloads of the plain shape whose values may still be out of the mapping's range."""
    from hypothesis import strategies as st

    def either(good, bad):
        return good if plain_only else st.one_of(good, good, good, bad)

    def obj(required: dict, optional: dict, rare: dict):
        if plain_only:
            return st.fixed_dictionaries(required, optional=optional)
        return st.one_of(st.fixed_dictionaries(required, optional=optional),
                         st.fixed_dictionaries(required, optional={**optional, **rare}),
                         st.fixed_dictionaries({}, optional={**required, **optional, **rare}))

    anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3),
                         st.just([]), st.just({}))
    custom = st.one_of(st.fixed_dictionaries({"vendorId": st.text(max_size=3)}), st.just({}),
                       st.just({"vendorId": "v", "x": 1}), st.just({"vendorId": "v" * 256}))
    measurands = ["SoC", "Power.Active.Import", "Power.Active.Export", "Power.Active.Setpoint", "Voltage",
                  "Display.PresentSOC", "Energy.Active.Import.Register"]
    number = st.one_of(st.integers(-10**7, 10**7), st.floats(-1e7, 1e7), st.sampled_from([0, 55, 100.0, 101, -1]))
    unit = obj({}, {"unit": either(st.sampled_from(["W", "kW", "Percent", "A", "u" * 20]),
                                   st.one_of(st.just("u" * 21), anything)),
                    "multiplier": either(st.integers(-4, 4), anything)},
               {"customData": custom, "bogus": anything})
    sampled = obj({"value": either(number, anything)},
                  {"measurand": either(st.sampled_from(measurands), anything),
                   "context": either(st.sampled_from(["Sample.Periodic", "Trigger"]), anything),
                   "phase": either(st.sampled_from(["L1", "L2-N", "N", "L1-L2"]), anything),
                   "location": either(st.sampled_from(["Outlet", "EV"]), anything),
                   "unitOfMeasure": either(unit, anything)},
                  {"customData": custom, "bogus": anything,
                   "signedMeterValue": st.one_of(st.just({"signedMeterData": "a", "encodingMethod": "e"}), anything)})
    meter_value = obj({"timestamp": either(st.just(TS), anything),
                       "sampledValue": either(st.lists(sampled, min_size=1, max_size=4), anything)}, {},
                      {"customData": custom, "bogus": anything})
    return obj({"evseId": either(st.integers(0, 3), st.one_of(st.integers(-2, -1), anything)),
                "meterValue": either(st.lists(meter_value, min_size=1, max_size=2), anything)}, {},
               {"customData": custom, "bogus": anything})


try:
    from hypothesis import given, settings

    @settings(max_examples=400, deadline=None)
    @given(payload=_meter_payloads())
    def test_generated_meter_values_get_the_verdict_and_code_of_the_ocpp_package(payload):
        """Generated payloads near the schema's lines get the package's verdict and code, and the plain check never
        takes one the schema refuses (2.1 and 2.0.1)."""
        for version in ("2.1", "2.0.1"):
            _same_as_the_package(version, payload)

    @settings(max_examples=300, deadline=None)
    @given(payload=_meter_payloads(plain_only=True))
    def test_plain_meter_values_read_as_sent_give_what_the_snake_case_path_gives(payload):
        """For a payload the plain check takes, parse_meter_values on the keys as sent gives the reading (or the
        MappingError) that the ocpp package's snake_case conversion of it gives."""
        from v2grt.gateway import ocpp as gw
        from v2grt.gateway import ocpp_mapping as om

        assert ocpp_schema.plain_meter_values("2.1")(payload)

        def read(fn):
            try:
                return fn()
            except om.MappingError as exc:
                return ("MappingError", str(exc))

        camel = read(lambda: om.parse_meter_values(payload["meterValue"], camel=True))
        snake = read(lambda: om.parse_meter_values(gw._snake(payload)["meter_value"]))
        assert camel == snake
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
