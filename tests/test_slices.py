"""Slice selections: parsing, formatting, the default hold-out."""

from __future__ import annotations

import pytest

from cellp2p.errors import CellP2PError
from cellp2p.slices import default_holdout, format_ranges, parse_slices


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-24", list(range(25))),
        ("1,3,5-7", [1, 3, 5, 6, 7]),
        (" 2 , 4 - 5 ", [2, 4, 5]),
        ("29", [29]),
        ("0-29", list(range(30))),
        (None, None),
        ("", None),
        ("  ", None),
    ],
)
def test_parse_slices(spec, expected):
    assert parse_slices(spec, 30) == expected


@pytest.mark.parametrize("spec", ["a", "1-b", "1;2", "-1", "3-", "1.5", "5-3", ",", "1,,2"])
def test_parse_slices_bad_syntax(spec):
    with pytest.raises(CellP2PError, match="0-24 or 1,3,5-7"):
        parse_slices(spec, 30)


@pytest.mark.parametrize("spec", ["30", "0-30", "25-40", "1,99"])
def test_parse_slices_out_of_range(spec):
    with pytest.raises(CellP2PError, match=r"the stack has 30 slices \(0-29\)"):
        parse_slices(spec, 30)


def test_huge_range_is_refused_before_it_is_expanded():
    with pytest.raises(CellP2PError, match="beyond"):
        parse_slices("0-99999999999", 30)


@pytest.mark.parametrize(
    ("ids", "text"), [([25, 26, 27, 29], "25-27,29"), ([3], "3"), ([], "(none)"), ([5, 1], "1,5")]
)
def test_format_ranges_reads_back(ids, text):
    assert format_ranges(ids) == text
    if ids:
        assert parse_slices(text, 30) == sorted(ids)


@pytest.mark.parametrize(
    ("n", "train", "val"), [(1, [0], [0]), (2, [0], [1]), (10, list(range(8)), [8, 9])]
)
def test_default_holdout_is_the_last_fifth(n, train, val):
    assert default_holdout(n) == (train, val)
