"""OCPP-J payloads checked against the JSON schemas that the ``ocpp`` package ships, compiled once.

The ``ocpp`` package validates each payload with ``jsonschema`` (Draft 4): at 200 stations it was
the largest cost of the gateway (py-spy: 37 % of the gateway process's samples, most of its busy
time, in `v2grt bench e2e --protocol ocpp`). The same schema files compiled to Python code with
``fastjsonschema`` reach the same verdicts about 16x faster (a MeterValues request: 14 us instead of
232 us at the median; `v2grt bench ocpp_schema`). Semantics follow the package: Draft 4, formats
(``date-time``) not enforced, no defaults filled in, and the failing keyword mapped to the same CALLERROR
codes (``type``/``maxLength`` -> TypeConstraintViolation, ``required`` -> ProtocolError, anything else ->
FormatViolation);
tests/test_ocpp_schema.py holds the two side by side.

MeterValues, every EVSE's every second, has a faster first check (:func:`check_meter_values`): a sufficient
test of the plain shape stations send (only ``evseId`` and ``meterValue``; sampled values with a value,
enumerations, a unit and a multiplier), built from the same schema file's enumerations and limits; anything
else, every invalid payload included, goes through the compiled schema as before, so the verdicts and codes
cannot differ. 9-11 % of the gateway's CPU at 1,000 stations x 2 EVSEs was this check (py-spy). The replies
to the gateway's own CALLs that are a bare status (``{"status": "Accepted"}``) get the same kind of first check
(:func:`plain_status_reply`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import fastjsonschema
import ocpp
from ocpp.exceptions import FormatViolationError, OCPPError, ProtocolError, TypeConstraintViolationError
from ocpp.exceptions import NotImplementedError as OcppNotImplemented

#: ocpp version string (ChargePoint._ocpp_version) -> the package's schema folder
_FOLDERS = {"2.1": "v21", "2.0.1": "v201"}
_DRAFT4 = "http://json-schema.org/draft-04/schema#"
_cache: dict[tuple[str, str, bool], Callable[[dict], object]] = {}


def _compile(version: str, action: str, response: bool) -> Callable[[dict], object]:
    folder = _FOLDERS.get(version)
    name = f"{action}{'Response' if response else 'Request'}"
    path = os.path.join(os.path.dirname(ocpp.__file__), folder or "-", "schemas", f"{name}.json")
    if folder is None or not action.isalnum() or not os.path.exists(path):
        raise OcppNotImplemented(details={"cause": f"no schema for {action[:60]!r} in OCPP {version}"})
    with open(path, encoding="utf-8-sig") as fh:  # the 2.x schema files start with a BOM
        schema = json.load(fh)
    schema["$schema"] = _DRAFT4  # as the package checks them (its notes: draft-06 declared, draft-4 used)
    return fastjsonschema.compile(schema, use_default=False, use_formats=False)


def validator(version: str, action: str, *, response: bool = False) -> Callable[[dict], object]:
    """The compiled check of ``action``'s request (or response) payload in OCPP ``version`` ("2.1", "2.0.1")."""
    key = (version, action, response)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = _compile(version, action, response)
    return fn


def validate(version: str, action: str, payload, *, response: bool = False) -> None:
    """Raise the OCPPError a station would get for ``payload`` (the ``ocpp`` package's codes); None if valid."""
    if response:  # a reply to one of the gateway's CALLs: a bare status first (plain_status_reply)
        plain = _plain_replies.get((version, action), _UNBUILT)
        if plain is _UNBUILT:
            plain = plain_status_reply(version, action)
        if plain is not None and plain(payload):
            return
    check = validator(version, action, response=response)
    try:
        check(payload)
    except fastjsonschema.JsonSchemaValueException as exc:
        cause = f"{exc.name}: {exc.message}"[:200]
        if exc.rule in ("type", "maxLength"):
            raise TypeConstraintViolationError(details={"cause": cause}) from None
        if exc.rule == "required":
            raise ProtocolError(details={"cause": cause}) from None
        raise FormatViolationError(details={"cause": cause}) from None


#: keywords that say nothing about validity (documentation, code generation, defaults not filled in)
_NOTES = frozenset({"description", "javaType", "default", "comment", "$id", "$schema", "definitions"})
_plain_cache: dict[str, Callable[[object], bool] | None] = {}


def _load(version: str, name: str) -> dict:
    folder = _FOLDERS[version]
    path = os.path.join(os.path.dirname(ocpp.__file__), folder, "schemas", f"{name}.json")
    with open(path, encoding="utf-8-sig") as fh:
        return json.load(fh)


class _Shape:
    """Reading a schema's parts for a plain check: each accessor returns None (or raises KeyError/TypeError) when
    the part has a keyword the plain check does not enforce, so the check is only built for shapes it knows."""

    def __init__(self, schema: dict):
        self.defs = schema.get("definitions", {})

    def rules(self, node: dict) -> dict:
        if "$ref" in node:
            node = self.defs[node["$ref"].rpartition("/")[2]]
        return {k: v for k, v in node.items() if k not in _NOTES}

    def obj(self, node: dict, required: list) -> dict | None:
        """The properties of an object without additional properties that requires exactly ``required``."""
        r = self.rules(node)
        if r.get("type") != "object" or r.get("additionalProperties") is not False \
                or sorted(r.get("required", [])) != sorted(required) or set(r) - {"type", "additionalProperties",
                                                                                   "properties", "required"}:
            return None
        return r["properties"]

    def array_of(self, node: dict) -> dict | None:
        """The item schema of an array of at least one item (and no other limit)."""
        r = self.rules(node)
        if r.get("type") != "array" or r.get("minItems") != 1 or set(r) - {"type", "additionalItems", "items",
                                                                          "minItems"}:
            return None
        return r["items"]

    def enum(self, node: dict) -> frozenset | None:
        """The strings of a string enumeration."""
        r = self.rules(node)
        if r.get("type") != "string" or set(r) - {"type", "additionalProperties", "enum"}:
            return None
        return frozenset(r["enum"]) if all(isinstance(x, str) for x in r.get("enum", [None])) else None


def _plain_meter_values(schema: dict) -> Callable[[object], bool] | None:
    """The sufficient check of a MeterValues request from its schema, or None if the schema is not shaped as
    this check assumes (then every payload takes the compiled check: a changed schema costs speed, not rules).

    Every keyword of every part the check accepts is matched against what the check enforces; a keyword it
    does not know (a ``maximum``, a ``maxItems``, a new required field) turns the fast path off."""
    shape = _Shape(schema)
    rules, obj, array_of, enum = shape.rules, shape.obj, shape.array_of, shape.enum
    try:
        top = obj(schema, ["evseId", "meterValue"])
        mv = obj(array_of(top["meterValue"]), ["timestamp", "sampledValue"])
        sv = obj(array_of(mv["sampledValue"]), ["value"])
        uom = obj(sv["unitOfMeasure"], [])
        enums = {k: enum(sv[k]) for k in ("measurand", "context", "phase", "location")}
        unit, mult = rules(uom["unit"]), rules(uom["multiplier"])
        # 2.0.1's evseId has no minimum: the plain check still wants >= 0 (the rest take the compiled check)
        ok = (rules(top["evseId"]) in ({"type": "integer", "minimum": 0}, {"type": "integer"})
              and rules(mv["timestamp"]) in ({"type": "string"}, {"type": "string", "format": "date-time"})
              and rules(sv["value"]) == {"type": "number"} and None not in enums.values()
              and set(unit) == {"type", "maxLength"} and unit["type"] == "string"
              and isinstance(unit["maxLength"], int) and rules(mult) == {"type": "integer"})
    except (KeyError, TypeError, AttributeError):
        return None
    if not ok:
        return None
    unit_max = unit["maxLength"]
    enum_of = enums.get  # measurand, context, phase, location -> the allowed strings

    def plain(payload) -> bool:
        """True only for a payload the schema accepts (formats not enforced, as the compiled check)."""
        if type(payload) is not dict or len(payload) != 2:
            return False
        evse, mvs = payload.get("evseId"), payload.get("meterValue")
        if type(evse) is not int or evse < 0 or type(mvs) is not list or not mvs:
            return False
        for m in mvs:
            if type(m) is not dict or len(m) != 2 or type(m.get("timestamp")) is not str:
                return False
            svs = m.get("sampledValue")
            if type(svs) is not list or not svs:
                return False
            for s in svs:
                if type(s) is not dict or "value" not in s:
                    return False
                for key, x in s.items():
                    if key == "value":
                        if type(x) is not float and type(x) is not int:
                            return False
                    elif key == "unitOfMeasure":
                        if type(x) is not dict:
                            return False
                        for k, y in x.items():
                            if k == "unit":
                                if type(y) is not str or len(y) > unit_max:
                                    return False
                            elif k != "multiplier" or type(y) is not int:
                                return False
                    else:
                        allowed = enum_of(key)
                        if allowed is None or type(x) is not str or x not in allowed:
                            return False
        return True

    return plain


def check_meter_values(version: str, payload) -> bool:
    """``validate(version, "MeterValues", payload)`` for the hottest message: the same OCPPError for a bad
    payload; True when the payload has the plain shape (only ``evseId`` and ``meterValue``, camelCase keys the
    caller may read as sent), False when it is valid but took the compiled check."""
    try:
        plain = _plain_cache[version]
    except KeyError:
        plain = plain_meter_values(version)
    if plain is not None and plain(payload):
        return True
    validate(version, "MeterValues", payload)
    return False


_UNBUILT = object()
_plain_replies: dict[tuple[str, str], Callable[[object], bool] | None] = {}


def _plain_status(schema: dict) -> Callable[[object], bool] | None:
    """The sufficient check of a reply that requires only ``status``, an enumeration: ``{"status": <one of
    it>}`` and nothing else (a reason, custom data: the compiled check). None for any other schema."""
    shape = _Shape(schema)
    try:
        props = shape.obj(schema, ["status"])
        allowed = shape.enum(props["status"])
    except (KeyError, TypeError, AttributeError):
        return None
    if allowed is None:
        return None

    def plain(payload) -> bool:
        """True only for a payload the schema accepts."""
        if type(payload) is not dict or len(payload) != 1:
            return False
        status = payload.get("status")
        return type(status) is str and status in allowed

    return plain


def plain_status_reply(version: str, action: str) -> Callable[[object], bool] | None:
    """The sufficient check of ``action``'s reply in OCPP ``version`` (None: the compiled check alone). The
    replies to the gateway's own CALLs (UpdateDynamicSchedule at every setpoint change) are bare statuses; the
    compiled check took ~7 us of each, this ~0.3 us."""
    plain = _plain_replies.get((version, action), _UNBUILT)
    if plain is _UNBUILT:
        validator(version, action, response=True)  # NotImplemented for an action without a schema, as before
        plain = _plain_replies[(version, action)] = _plain_status(_load(version, f"{action}Response"))
    return plain


def plain_meter_values(version: str) -> Callable[[object], bool] | None:
    """The sufficient check of MeterValues in OCPP ``version`` (None: every payload takes the compiled check)."""
    plain = _plain_cache.get(version)
    if version not in _plain_cache:
        plain = _plain_cache[version] = (_plain_meter_values(_load(version, "MeterValuesRequest"))
                                         if version in _FOLDERS else None)
    return plain


def precompile(version: str, actions, *, response: bool = False) -> None:
    """Compile these actions' checks now (tens of ms each), not at the first message of a busy moment."""
    for action in actions:
        validator(version, action, response=response)
        if response:
            plain_status_reply(version, action)
        elif action == "MeterValues":
            plain_meter_values(version)


__all__ = ["OCPPError", "check_meter_values", "plain_meter_values", "plain_status_reply", "precompile", "validate",
           "validator"]
