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


def precompile(version: str, actions, *, response: bool = False) -> None:
    """Compile these actions' checks now (tens of ms each), not at the first message of a busy moment."""
    for action in actions:
        validator(version, action, response=response)


__all__ = ["OCPPError", "precompile", "validate", "validator"]
