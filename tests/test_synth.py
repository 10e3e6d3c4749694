"""Synthetic paired stacks: shapes, dtypes, determinism, label conventions, files."""

from __future__ import annotations

import numpy as np
import pytest

from cellp2p.errors import CellP2PError
from cellp2p.io import read_stack
from cellp2p.synth import EM_SPACING, make_em, make_nuclei, parse_size, synth


@pytest.fixture(scope="module")
def em() -> tuple[np.ndarray, np.ndarray]:
    return make_em(6, (96, 128), seed=3)


def test_em_shapes_and_dtypes(em: tuple[np.ndarray, np.ndarray]) -> None:
    volume, labels = em
    assert volume.shape == labels.shape == (6, 96, 128)
    assert volume.dtype == labels.dtype == np.uint8


def test_em_labels_binary_isbi_convention(em: tuple[np.ndarray, np.ndarray]) -> None:
    volume, labels = em
    assert set(np.unique(labels).tolist()) == {0, 255}
    membrane = labels == 0
    assert 0.1 <= membrane.mean() <= 0.35
    # Membranes are the dark pixels, as in ssTEM.
    assert volume[membrane].mean() < volume[~membrane].mean() - 30


def test_em_slices_change_smoothly(em: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = em
    # Neighbouring sections share most membrane layout; they are not identical either.
    same = (labels[1:] == labels[:-1]).mean()
    assert 0.7 < same < 1.0


def test_em_deterministic() -> None:
    a = make_em(3, (64, 48), seed=7)
    b = make_em(3, (64, 48), seed=7)
    c = make_em(3, (64, 48), seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_nuclei_shapes_dtypes_instances() -> None:
    volume, labels = make_nuclei(6, (96, 80), seed=1)
    assert volume.shape == labels.shape == (6, 96, 80)
    assert volume.dtype == np.uint16
    assert labels.dtype in (np.uint16, np.uint32)
    ids = np.unique(labels)
    assert ids[0] == 0 and len(ids) > 1
    assert np.array_equal(ids, np.arange(len(ids)))  # 0 = background, then 1..N
    assert volume[labels > 0].mean() > 2 * volume[labels == 0].mean()
    assert volume.max() > 255  # a real 16-bit range, not 8-bit data in 16-bit clothes


def test_nuclei_deterministic() -> None:
    a = make_nuclei(4, (48, 48), seed=5)
    b = make_nuclei(4, (48, 48), seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_tiny_sizes_work() -> None:
    volume, labels = make_em(1, (5, 3), seed=0)
    assert volume.shape == (1, 5, 3)
    volume, labels = make_nuclei(1, (4, 4), seed=0)
    assert labels.max() >= 1


@pytest.mark.parametrize("kind", ["em", "nuclei"])
def test_synth_writes_readable_pair(tmp_path, kind: str) -> None:
    vol_path, lab_path = synth(kind, tmp_path / "out", 3, (40, 32), seed=2)
    assert vol_path == tmp_path / "out" / "volume.tif"
    assert lab_path == tmp_path / "out" / "labels.tif"
    vol, lab = read_stack(vol_path), read_stack(lab_path)
    expected = make_em(3, (40, 32), 2) if kind == "em" else make_nuclei(3, (40, 32), 2)
    assert np.array_equal(vol.data, expected[0])
    assert np.array_equal(lab.data, expected[1])
    assert vol.spacing is not None
    if kind == "em":
        assert vol.spacing == pytest.approx(EM_SPACING, rel=1e-4)


def test_synth_refuses_overwrite_without_force(tmp_path) -> None:
    synth("em", tmp_path, 2, (16, 16))
    with pytest.raises(CellP2PError, match="--force"):
        synth("em", tmp_path, 2, (16, 16), seed=1)
    synth("em", tmp_path, 2, (16, 16), seed=1, force=True)
    assert np.array_equal(read_stack(tmp_path / "volume.tif").data, make_em(2, (16, 16), 1)[0])


@pytest.mark.parametrize(
    ("kind", "slices", "size"),
    [("cells", 2, (16, 16)), ("em", 0, (16, 16)), ("em", 2, (0, 16)), ("nuclei", 2, (16, -1))],
)
def test_synth_bad_arguments(tmp_path, kind: str, slices: int, size: tuple[int, int]) -> None:
    with pytest.raises(CellP2PError):
        synth(kind, tmp_path, slices, size)
    assert not any(tmp_path.iterdir())


def test_parse_size() -> None:
    assert parse_size("256") == (256, 256)
    assert parse_size("256x128") == (256, 128)
    assert parse_size(" 64X32 ") == (64, 32)
    for bad in ["", "x", "256x", "0", "12x0", "-4", "1.5", "abc", "3x4x5"]:
        with pytest.raises(CellP2PError):
            parse_size(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seed": -1}, "non-negative"), ({"size": (100000, 100000)}, "larger than synthetic")],
)
def test_synth_refuses_bad_seed_and_huge_sizes_before_writing(tmp_path, kwargs, match):
    args = {"kind": "em", "out": tmp_path / "d", "slices": 2, "size": (32, 32), **kwargs}
    with pytest.raises(CellP2PError, match=match):
        synth(**args)
    assert not (tmp_path / "d").exists()


# -- realistic nuclei (DSB 2018-like): clusters, touching, varied ---------------------------------


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray]:
    return make_nuclei(8, (256, 256), seed=0)


def _touching_pairs(lab: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different objects that are 4-neighbours somewhere (a shared border)."""
    pairs: set[tuple[int, int]] = set()
    for a, b in ((lab[:, 1:], lab[:, :-1]), (lab[1:], lab[:-1])):
        m = (a > 0) & (b > 0) & (a != b)
        for p, q in zip(a[m].tolist(), b[m].tolist(), strict=True):
            pairs.add((min(p, q), max(p, q)))
    return pairs


def test_nuclei_touch_in_clusters_without_gaps(nuclei) -> None:
    from scipy import ndimage as ndi

    _, labels = nuclei
    four = ndi.generate_binary_structure(2, 1)
    touching = objects = clusters = 0
    for lab in labels:
        touching += len(_touching_pairs(lab))
        objects += len(np.unique(lab)) - 1
        clusters += ndi.label(lab > 0, structure=four)[1]
    assert touching >= 100  # measured: 157 pairs over the 8 slices
    assert clusters < 0.7 * objects  # connected components merge many nuclei (measured: 0.58)


def test_nuclei_each_section_is_one_piece(nuclei) -> None:
    from skimage.measure import label

    _, labels = nuclei
    assert labels.dtype == np.uint16
    for lab in labels:
        # Labelling the id image splits only an id whose section is in several pieces.
        assert label(lab, background=0, connectivity=1).max() == len(np.unique(lab)) - 1


def test_nuclei_vary_in_size_shape_and_brightness(nuclei) -> None:
    from skimage.measure import regionprops

    volume, labels = nuclei
    props = [
        p
        for lab, img in zip(labels, volume, strict=True)
        for p in regionprops(lab, intensity_image=img)
        if p.area >= 50
    ]
    areas = np.array([p.area for p in props])
    ecc = np.array([p.eccentricity for p in props])
    orient = np.array([p.orientation for p in props])
    bright = np.array([p.intensity_mean for p in props])
    assert areas.max() > 2 * np.median(areas) and areas.std() / areas.mean() > 0.3
    assert ecc.min() < 0.5 and ecc.max() > 0.8  # round ones and elongated ones
    assert orient.std() > 0.6  # all orientations
    assert bright.std() / bright.mean() > 0.25


def test_nuclei_background_is_uneven(nuclei) -> None:
    volume, labels = nuclei
    back = np.where(labels == 0, volume.astype(np.float32), np.nan)
    quarters = [np.nanmean(back[:, y : y + 128, x : x + 128]) for y in (0, 128) for x in (0, 128)]
    assert max(quarters) - min(quarters) > 10  # a gradient/haze, not a flat offset
    assert np.nanstd(back) > 10  # plus noise


def test_nuclei_fast() -> None:
    import time

    start = time.process_time()
    make_nuclei(8, (256, 256), seed=3)
    assert time.process_time() - start < 2.0  # ~0.1 s of CPU on an idle core
