"""Checks of request fields: each bad value is a 400 that names its field."""
from __future__ import annotations

import math

from salmonn_cli.decoding import DecodingOptions, verify_options
from salmonn_cli.errors import SalmonnError
from salmonn_cli.serve.errors import bad_request

_MISSING = object()


def number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False, param: str | None = None):
    """body[name] as a number in [low, high] (None or absent: `default`)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise bad_request(f"{name} must be {kind}, not {value!r}", param=param or name)
    if not math.isfinite(value) or not low <= value <= high:
        raise bad_request(f"{name} must be between {low:g} and {high:g}, not {value!r}", param=param or name)
    return int(value) if integer else float(value)


def request_decoding(served: DecodingOptions, max_tokens: int | None, **fields) -> DecodingOptions:
    """A request's decoding, checked as the command line's: beams not given are the server's own (1 when
    sampling), no more than it was started for; `max_tokens` is capped at the server's."""
    max_tokens = served.max_tokens if max_tokens is None else min(max_tokens, served.max_tokens)
    try:
        return verify_options(DecodingOptions(max_tokens=max_tokens, **fields), default_beams=served.beams,
                              max_beams=served.beams)
    except SalmonnError as e:
        raise bad_request(str(e), param="beams") from None


def flag(body: dict, name: str, default: bool | None = False) -> bool | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, not {value!r}", param=name)
    return value


def form_number(fields: dict[str, str], name: str, default, low: float, high: float, *, integer: bool = False):
    """A multipart text field as a number, with the same checks."""
    if name not in fields or fields[name].strip() == "":
        return default
    try:
        value = float(fields[name])
    except ValueError:
        raise bad_request(f"{name} must be a number, not {fields[name]!r}", param=name) from None
    return number({name: value}, name, default, low, high, integer=integer)

