"""Slice selections: ``"0-24"`` / ``"1,3,5-7"`` specs, their formatting, the default hold-out."""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence

import numpy as np

from cellp2p.errors import CellP2PError

MAX_SLICES = 1_000_000  # no stack has more; larger indices are typos (and would eat memory)
_RANGE_ITEM = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def expand(
    spec: str | Sequence[int], *, where: str = "slices", limit: int = MAX_SLICES
) -> list[int]:
    """``"0-24"`` / ``"0-9,12"`` (inclusive ranges) or a list of ints → sorted unique indices.

    Every index must be below ``limit``; that is checked before a range is expanded, so
    ``"0-99999999999"`` is refused at once instead of filling memory. Raises ValueError.
    """
    if not isinstance(spec, str):
        try:  # any integer type (numpy's too), but not bools or floats
            items = [operator.index(i) for i in spec if not isinstance(i, bool | np.bool_)]
        except TypeError:
            items = [-1]
        if len(items) != len(list(spec)) or any(i < 0 for i in items):
            raise ValueError(f"{where}: list must hold non-negative integers")
        if items and max(items) >= limit:
            raise ValueError(f"{where}: slice {max(items)} is beyond the {limit} slices")
        return sorted(set(items))
    out: set[int] = set()
    if not spec.strip():
        return []
    for item in (s.strip() for s in spec.split(",")):
        match = _RANGE_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{where}: cannot read {item!r}; use ranges such as '0-24' or '3'")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{where}: range {item!r} runs backwards")
        if hi >= limit:
            raise ValueError(f"{where}: slice {hi} is beyond the {limit} slices")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_slices(
    spec: str | Sequence[int] | None, n: int, what: str = "slice selection"
) -> list[int] | None:
    """A user's selection of the ``n`` slices of a stack (None when none is given)."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return None
    try:
        ids = expand(spec, where=f"{what} {spec!r}", limit=max(n, 1))
    except ValueError as err:
        last = f"0-{n - 1}" if n > 0 else "none"
        raise CellP2PError(
            f"{err}; the stack has {n} slices ({last}): use ranges and lists like 0-24 or 1,3,5-7"
        ) from None
    if not ids:
        raise CellP2PError(f"{what} {spec!r} selects no slice; use e.g. 0-24 or 1,3,5-7")
    return ids


def format_ranges(ids: Sequence[int]) -> str:
    """[25, 26, 27, 29] → ``"25-27,29"`` (what :func:`parse_slices` reads back)."""
    ids = sorted(ids)
    if not ids:
        return "(none)"
    parts, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def default_holdout(n: int) -> tuple[list[int], list[int]]:
    """(train, val) without a split: the last fifth (at least one slice) is held out.

    A one-slice stack trains and validates on its only slice.
    """
    if n <= 1:
        return list(range(n)), list(range(n))
    n_val = max(1, n // 5)
    return list(range(n - n_val)), list(range(n - n_val, n))
