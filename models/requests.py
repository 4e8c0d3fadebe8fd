"""Request records of the served model: validation into :class:`Request` objects.

A record has ``user_id``, optional ``k`` (default 10), optional ``recent_items`` (item ids of a
live session, newest last) and optional ``exclude`` (item ids never to return). A malformed record
raises :class:`RequestError`, naming the record and the field, which the server answers with a
4xx.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.columns import USER
from models.errors import ShoprankError


class RequestError(ShoprankError, ValueError):
    """A request record is malformed; ``field`` names the offending field."""

    def __init__(self, message: str, field: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Request:
    """One validated request record."""

    user_id: str
    k: int
    recent_items: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parse_id(value: Any, where: str, field: str) -> str:
    if isinstance(value, (str, np.str_)) and str(value).strip():
        return str(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    raise RequestError(
        f"{where}: {field} must be a non-empty string (or integer) id; got {value!r}.", field
    )


def _parse_k(value: Any, where: str, default_k: int, max_k: int) -> int:
    if _missing(value):
        return default_k
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )
    if isinstance(value, (bool, np.bool_)) or not integral or not 1 <= int(value) <= max_k:
        raise RequestError(f"{where}: k must be an integer from 1 to {max_k}; got {value!r}.", "k")
    return int(value)


def _parse_items(value: Any, where: str, field: str) -> tuple[str, ...]:
    if _missing(value):
        return ()
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise RequestError(
            f"{where}: {field} must be a list of item ids; got {type(value).__name__} {value!r}.",
            field,
        )
    return tuple(_parse_id(item, where, f"{field} item") for item in value)


def parse_requests(
    records: Sequence[Mapping[str, Any]], default_k: int = 10, max_k: int = 200
) -> list[Request]:
    """Validate request records (dicts) into :class:`Request` objects.

    Raises:
        RequestError: A record is not a mapping, lacks ``user_id``, has a ``k`` that is not an
            integer in ``1..max_k``, a ``recent_items``/``exclude`` that is not a list of ids, or
            repeats a user of an earlier record. The message names the record and the field.
    """
    if len(records) == 0:
        raise RequestError("the request holds no records: send at least one with a user_id.", USER)
    parsed, seen = [], set()
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, Mapping):
            raise RequestError(f"{where} must be an object with a user_id; got {record!r}.", USER)
        if _missing(record.get(USER)):
            raise RequestError(f"{where}: user_id is missing; every record needs one.", USER)
        user = _parse_id(record[USER], where, USER)
        if user in seen:
            raise RequestError(
                f"{where}: user_id {user!r} appears twice; send one record per user.", USER
            )
        seen.add(user)
        parsed.append(
            Request(
                user,
                _parse_k(record.get("k"), where, default_k, max_k),
                _parse_items(record.get("recent_items"), where, "recent_items"),
                _parse_items(record.get("exclude"), where, "exclude"),
            )
        )
    return parsed
