"""Data sources and the one split rule (cellp2p.sources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellp2p.errors import CellP2PError
from cellp2p.sources import (
    Sources,
    Split,
    recorded_val_slices,
    resolve_sources,
    split_slices,
)


@pytest.mark.parametrize(
    ("n", "train", "val", "split", "expected"),
    [
        # nothing given: the last fifth is held out (at least one slice)
        (10, None, None, None, ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])),
        (4, None, None, None, ([0, 1, 2], [3])),
        (1, None, None, None, ([0], [0])),  # one slice trains and validates
        # explicit slices win over a declared split
        (6, "0-3", "4-5", Split([0], [1]), ([0, 1, 2, 3], [4, 5])),
        # train only: val is the rest (or the last training slice when nothing is left)
        (6, "0-3", None, None, ([0, 1, 2, 3], [4, 5])),
        (3, "0-2", None, None, ([0, 1, 2], [2])),
        # val only: train is still the default hold-out's train side
        (10, None, "0", None, ([0, 1, 2, 3, 4, 5, 6, 7], [0])),
        # a declared split (a manifest's) when nothing explicit is given
        (6, None, None, Split([0, 1, 2], [5]), ([0, 1, 2], [5])),
        (6, None, None, Split(None, [5]), ([0, 1, 2, 3, 4], [5])),
        (6, "1", None, Split([0, 1, 2], [5]), ([1], [5])),
    ],
)
def test_split_rule(n, train, val, split, expected):
    assert split_slices(n, train, val, split) == expected


def test_split_refuses_indices_outside_the_stack():
    with pytest.raises(CellP2PError, match="val slice 9 is out of range"):
        split_slices(6, None, None, Split([0], [9]), where="v.tif")
    with pytest.raises(CellP2PError, match="the stack has 6 slices"):
        split_slices(6, "0-7")


def test_resolve_sources_files_and_errors(tmp_path):
    src = resolve_sources(tmp_path / "v.tif", tmp_path / "l.tif")
    assert src == Sources(tmp_path / "v.tif", tmp_path / "l.tif")
    assert src.describe() == {"volume": str(tmp_path / "v.tif"), "labels": str(tmp_path / "l.tif")}
    with pytest.raises(CellP2PError, match="not both"):
        resolve_sources(tmp_path / "v.tif", None, manifest="isbi2012")
    with pytest.raises(CellP2PError, match="nothing to do"):
        resolve_sources(tmp_path / "v.tif", None, missing="nothing to do")


def test_recorded_val_slices():
    assert recorded_val_slices({}, 10) is None  # the caller applies the default hold-out
    assert recorded_val_slices({"val_slices": "4-5"}, 10) == [4, 5]
    assert recorded_val_slices({"train_slices": "0-7"}, 10) == [8, 9]
    assert recorded_val_slices({"train_slices": "0-9", "val_slices": None}, 10) == [9]


def test_describe_names_the_manifest():
    src = Sources(Path("v.tif"), Path("l.tif"), "isbi2012", Split([0], [1]))
    assert src.describe() == {"manifest": "isbi2012", "volume": "v.tif", "labels": "l.tif"}
