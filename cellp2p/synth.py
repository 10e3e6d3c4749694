"""Seeded synthetic paired stacks: EM-like membranes and fluorescence-like nuclei.

They are the built-in default data for the demo and the tests: the same seed gives the same
arrays (NumPy's PCG64 generator plus deterministic SciPy filters and float32 arithmetic).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from cellp2p.errors import CellP2PError

KINDS = ("em", "nuclei")
# Pixel sizes (z, y, x) in um: ISBI 2012 is 4 x 4 x 50 nm; nuclei like a confocal stack.
EM_SPACING = (0.05, 0.004, 0.004)
NUCLEI_SPACING = (1.0, 0.2, 0.2)

# Mean Voronoi cell area in px: membrane fraction ~ 1.9 * width / sqrt(area), so ~30 px
# wide cells with 2-4 px membranes give the ~20% membrane pixels of ISBI 2012.
_EM_CELL_AREA = 900.0
MAX_SIDE = 16384  # synthetic slices larger than this are typos (and would take minutes)
MAX_VOXELS = 2**30  # 1 Gi voxels: a few GB of float32 working memory
_EM_MARGIN = 40  # seeds also fall outside the image so edge cells are cut, not stretched


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def _smooth_volume(
    rng: np.random.Generator, slices: int, shape: tuple[int, int], step: int, sigma_z: float
) -> np.ndarray:
    """Smooth noise (Z, Y, X) made on a coarse grid and upsampled: cheap for big stacks."""
    coarse = (slices, shape[0] // step + 3, shape[1] // step + 3)
    field = ndi.gaussian_filter(
        rng.standard_normal(coarse).astype(np.float32), (sigma_z, 1.0, 1.0), mode="nearest"
    )
    field /= max(float(field.std()), 1e-6)
    # Bilinear upsampling as two small matrix products (BLAS): far faster than gathers.
    rows = _interp_matrix(shape[0], step) @ field  # (Z, H, cx)
    cols = np.ascontiguousarray(_interp_matrix(shape[1], step).T)
    # One 2D GEMM: NumPy's stacked matmul with a transposed operand skips BLAS.
    return (rows.reshape(-1, rows.shape[-1]) @ cols).reshape(slices, shape[0], shape[1])


def _interp_matrix(n: int, step: int) -> np.ndarray:
    """(n, n // step + 3) weights that linearly interpolate a coarse grid onto n pixels."""
    pos = np.arange(n, dtype=np.float64) / step + 1.0
    lo = np.floor(pos).astype(np.intp)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((n, n // step + 3), dtype=np.float32)
    mat[np.arange(n), lo] = 1.0 - frac
    mat[np.arange(n), lo + 1] = frac
    return mat


def _check_dims(slices: int, shape: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    try:
        z, h, w = int(slices), int(shape[0]), int(shape[1])
    except (TypeError, ValueError, IndexError):
        raise CellP2PError(
            f"synthetic data: bad size {slices} x {shape}; give slices and HxW as positive integers"
        ) from None
    if z < 1 or h < 1 or w < 1:
        raise CellP2PError(
            f"synthetic data: size {z} x {h} x {w} must be positive; "
            "pass e.g. --slices 8 --size 128"
        )
    if z * h * w > MAX_VOXELS or max(h, w) > MAX_SIDE:
        raise CellP2PError(
            f"synthetic data: {z} x {h} x {w} is larger than synthetic stacks go (at most "
            f"{MAX_SIDE} px a side and {MAX_VOXELS // 2**20} Mi voxels); pass a smaller "
            "--size or --slices"
        )
    return z, (h, w)


def _check_seed(seed: int) -> int:
    """NumPy seeds are non-negative integers."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise CellP2PError(f"--seed {seed}: give a non-negative integer, e.g. --seed 0")
    return seed


def _em_labels(rng: np.random.Generator, slices: int, shape: tuple[int, int]) -> np.ndarray:
    """Cell ids (Z, Y, X) of a drifting, warped Voronoi tessellation."""
    h, w = shape
    m = _EM_MARGIN
    area = (h + 2 * m) * (w + 2 * m)
    start = _clustered_points(rng, area / _EM_CELL_AREA, (h + 2 * m, w + 2 * m)) - m
    n = len(start)
    # Seeds drift smoothly (constant velocity plus a slow wobble): neighbouring sections
    # show the same cells slightly moved and reshaped, like a serial-section stack.
    velocity = rng.normal(0.0, 0.8, size=(n, 2))
    wobble_amp = rng.uniform(0.5, 2.5, size=(n, 2))
    wobble_phase = rng.uniform(0, 2 * np.pi, size=(n, 2))
    wobble_freq = rng.uniform(0.1, 0.3, size=(n, 1))
    # A smooth displacement field bends the straight Voronoi edges into curved membranes.
    warp_y = 5.0 * _smooth_volume(rng, slices, shape, step=32, sigma_z=4.0)
    warp_x = 5.0 * _smooth_volume(rng, slices, shape, step=32, sigma_z=4.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph, pw = h + 2 * m, w + 2 * m
    ids = np.arange(1, n + 1, dtype=np.int32)
    out = np.empty((slices, h, w), dtype=np.int32)
    for z in range(slices):
        pos = start + velocity * z + wobble_amp * np.sin(wobble_freq * z + wobble_phase)
        # A seed drifting off the padded field re-enters on the far side, in the margin.
        iy = np.round(pos[:, 0] + m).astype(np.intp) % ph
        ix = np.round(pos[:, 1] + m).astype(np.intp) % pw
        seeds = np.zeros((ph, pw), dtype=np.int32)
        seeds[iy, ix] = ids  # a later seed on the same pixel simply wins
        # Nearest seed of every pixel via the EDT's feature transform: ~30 ms per 512^2.
        near = ndi.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
        voronoi = seeds[near[0], near[1]]
        out[z] = ndi.map_coordinates(
            voronoi, [yy + warp_y[z] + m, xx + warp_x[z] + m], order=0, mode="nearest"
        )
    return out


def _clustered_points(
    rng: np.random.Generator, mean_count: float, extent: tuple[int, int]
) -> np.ndarray:
    """Random (y, x) points in [0, extent) whose density varies smoothly over the field.

    Uniform seeds give cells of one size; neuropil mixes large profiles with bundles of
    small ones, so the local density follows a smooth log-normal field.
    """
    cell = 48  # correlation length of the density, px
    coarse = _smooth_noise(rng, (extent[0] // cell + 2, extent[1] // cell + 2), 0.8)
    candidates = rng.uniform((0, 0), extent, size=(int(rng.poisson(4 * mean_count)) + 16, 2))
    log_density = ndi.map_coordinates(coarse, candidates.T / cell, order=1, mode="nearest")
    density = np.exp(0.6 * log_density)
    keep = rng.uniform(0, 1, len(candidates)) < density / density.max()
    points = candidates[keep]
    # Thin to the expected count so the membrane fraction does not depend on the field.
    target = max(4, int(rng.poisson(mean_count)))
    return points[:target] if len(points) >= target else candidates[:target]


def _membranes(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean membrane mask (Z, Y, X) 2-4 px wide along the cell boundaries."""
    slices, h, w = cells.shape
    edge = np.zeros(cells.shape, dtype=bool)
    # A pixel whose right or lower neighbour is another cell: a 1-px line on one side.
    edge[:, :, 1:] |= cells[:, :, 1:] != cells[:, :, :-1]
    edge[:, 1:, :] |= cells[:, 1:, :] != cells[:, :-1, :]
    two = edge.copy()
    two[:, :, :-1] |= edge[:, :, 1:]
    two[:, :-1, :] |= edge[:, 1:, :]  # ~2 px: both sides of the boundary
    # Thickness varies smoothly along the membranes: 2 px in thin stretches, ~4 px in thick.
    thick = _smooth_volume(rng, slices, (h, w), step=16, sigma_z=2.0) > 0.0
    grown = ndi.binary_dilation(two, structure=ndi.generate_binary_structure(3, 1)[1:2])
    return two | (grown & thick)


def _draw_ellipses(
    canvas: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    values: np.ndarray,
) -> None:
    """Add value * (filled ellipse) to a 2D canvas for each ellipse, in place."""
    h, w = canvas.shape
    for (cy, cx), (ry, rx), ang, val in zip(centres, radii, angles, values, strict=True):
        r = int(np.ceil(max(ry, rx))) + 1
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        c, s = np.cos(ang), np.sin(ang)
        u, v = (c * dy + s * dx) / ry, (-s * dy + c * dx) / rx
        canvas[y0:y1, x0:x1] += val * (u * u + v * v <= 1.0)


def make_em(slices: int, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """EM-like serial sections and ISBI-style labels (255 = cell interior, 0 = membrane), uint8."""
    slices, shape = _check_dims(slices, shape)
    h, w = shape
    rng = np.random.default_rng(_check_seed(seed))
    cells = _em_labels(rng, slices, shape)
    membrane = _membranes(cells, rng)
    labels = np.where(membrane, 0, 255).astype(np.uint8)

    # Cytoplasm grey level differs a little from cell to cell, as in ssTEM.
    ncell = int(cells.max()) + 1
    cell_grey = rng.normal(175.0, 12.0, size=ncell).astype(np.float32)
    img = cell_grey[cells]
    img += 10.0 * _smooth_volume(rng, slices, shape, step=8, sigma_z=1.0)  # cytoplasm texture
    # Membranes are dark but not uniformly so (staining and section angle vary).
    mem_grey = 70.0 + 20.0 * _smooth_volume(rng, slices, shape, step=32, sigma_z=2.0)
    img = np.where(membrane, mem_grey, img)

    area = h * w
    for z in range(slices):
        interior = ~membrane[z]
        # Vesicles: many small dark dots, one section thick (they are ~40 nm across).
        nves = int(rng.poisson(area / 400.0))
        dots = np.zeros(shape, dtype=np.float32)
        vy, vx = rng.integers(0, h, nves), rng.integers(0, w, nves)
        np.add.at(dots, (vy, vx), rng.uniform(0.6, 1.0, nves).astype(np.float32))
        dots = ndi.gaussian_filter(dots, 1.2) * (2 * np.pi * 1.2**2)  # peak ~ dot weight
        img[z] -= 70.0 * np.minimum(dots, 1.0) * interior
        # Mitochondria-like ellipses: darker, with lighter cristae stripes inside.
        nmito = int(rng.poisson(area / 9000.0))
        mito = np.zeros(shape, dtype=np.float32)
        _draw_ellipses(
            mito,
            rng.uniform((0, 0), (h, w), size=(nmito, 2)),
            np.column_stack([rng.uniform(6, 14, nmito), rng.uniform(3, 6, nmito)]),
            rng.uniform(0, np.pi, nmito),
            np.ones(nmito, dtype=np.float32),
        )
        mito = np.minimum(mito, 1.0) * interior
        cristae = 0.5 + 0.5 * np.sin((np.arange(w, dtype=np.float32) * 1.3)[None, :])
        img[z] -= mito * (60.0 - 25.0 * cristae)

    # Slowly varying illumination/section thickness, then the microscope's blur and noise.
    img *= 1.0 + 0.06 * _smooth_volume(rng, slices, shape, step=64, sigma_z=3.0)
    img = ndi.gaussian_filter(img, (0, 1.0, 1.0))
    img += rng.normal(0.0, 9.0, size=img.shape).astype(np.float32)
    volume = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return volume, labels


# Nuclei (DSB 2018-like fluorescence): mean radius 6-22 px, clusters of touching nuclei.
_NUC_AREA = 1450.0  # px of slice per nucleus: ~40 in a 256^2 slice, ~18% foreground
_NUC_ATTACH = 0.6  # chance that a nucleus grows a cluster: placed touching an earlier one
_NUC_CORE = 0.8  # no nucleus centre lies deeper than this (in shape units) inside another


def _radius_along(s: dict, theta: float) -> float:
    """The radius of a nucleus's ellipse (without its wobble) in the direction theta."""
    c, sn = np.cos(theta - s["angle"]), np.sin(theta - s["angle"])
    return float(1.0 / np.hypot(c / s["ry"], sn / s["rx"]))


def _nucleus(
    rng: np.random.Generator,
    centres: list[np.ndarray],
    shapes: list[dict],
    shape2d: tuple[int, int],
) -> tuple[np.ndarray, dict]:
    """Random centre (z = 0, y, x) and shape parameters of the next nucleus."""
    h, w = shape2d
    r = float(np.clip(np.exp(rng.normal(np.log(11.0), 0.3)), 6.0, 22.0))
    aspect = rng.uniform(1.0, 1.6)
    shape = {
        "ry": r * np.sqrt(aspect),
        "rx": r / np.sqrt(aspect),
        "rz": 1.0,  # one slice: a 2D image, every nucleus in focus and whole
        "angle": rng.uniform(0, np.pi),
        "amps": np.clip(rng.normal(0.0, 0.035, 3), -0.07, 0.07),  # harmonics 2-4: irregular
        "phases": rng.uniform(0, 2 * np.pi, 3),
    }
    if centres and rng.uniform() < _NUC_ATTACH:  # touch a random earlier nucleus
        k = int(rng.integers(len(centres)))
        theta = rng.uniform(0, 2 * np.pi)
        # Centres 85-100% of the two radii along the line apart: they overlap a little, and
        # the shared border is shorter than either nucleus is wide (a visible waist).
        reach = _radius_along(shapes[k], theta) + _radius_along(shape, theta)
        dist = rng.uniform(0.85, 1.0) * reach
        centre = centres[k] + np.array([0.0, dist * np.sin(theta), dist * np.cos(theta)])
    else:
        centre = np.array([0.0, rng.uniform(0, h), rng.uniform(0, w)])
    return centre, shape


def _shape_units(
    centre: np.ndarray, s: dict, z: np.ndarray, y: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """Shape distance q of points to a nucleus: < 1 inside, 0 at the centre (broadcasts)."""
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    c, sn = np.cos(s["angle"]), np.sin(s["angle"])
    u, v = (c * dy + sn * dx) / s["ry"], (-sn * dy + c * dx) / s["rx"]
    theta = np.arctan2(v, u)
    wobble = 1.0
    for k, (a, p) in enumerate(zip(s["amps"], s["phases"], strict=True), start=2):
        wobble = wobble + a * np.cos(k * theta + p)
    # Flat-topped along z (|dz|^4): sections stay near full size, then stop.
    return np.sqrt(u * u + v * v) / wobble + (dz / s["rz"]) ** 4


def _place_nuclei(
    rng: np.random.Generator, shape2d: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (1, Y, X) uint16 and shape distance q (float32, 1 outside) of clustered
    nuclei in one slice.

    Overlapping candidates share space: each voxel goes to the nucleus it is deepest inside
    (smallest q), so touching nuclei meet along a shared border without a gap.
    """
    h, w = shape2d
    dims = (1, h, w)
    labels = np.zeros(dims, dtype=np.uint16)
    best = np.ones(dims, dtype=np.float32)
    target = max(1, int(rng.poisson(h * w / _NUC_AREA)))
    centres: list[np.ndarray] = []
    shapes: list[dict] = []
    tries = 0
    while len(centres) < min(target, 65535) and tries < max(4 * target, 100):
        tries += 1
        centre, s = _nucleus(rng, centres, shapes, shape2d)
        iz, iy, ix = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, dims, strict=True))
        if not (0 <= centre[1] < h and 0 <= centre[2] < w) or best[iz, iy, ix] < _NUC_CORE:
            continue  # off the slice, or deep inside an earlier nucleus
        if centres:
            cz, cy, cx = np.asarray(centres).T
            if np.any(_shape_units(centre, s, cz, cy, cx) < _NUC_CORE):
                continue  # would swallow an earlier nucleus's centre
        R = int(np.ceil(max(s["ry"], s["rx"]) * 1.1)) + 1
        rz = int(np.ceil(s["rz"])) + 1
        lo = [max(int(c) - e, 0) for c, e in zip(centre, (rz, R, R), strict=True)]
        hi = [min(int(c) + e + 1, n) for c, e, n in zip(centre, (rz, R, R), dims, strict=True)]
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            continue
        z, y, x = (np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True))
        q = _shape_units(centre, s, z[:, None, None], y[None, :, None], x[None, None, :])
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        win = q < best[box]
        if not win.any():
            continue
        centres.append(centre)
        shapes.append(s)
        labels[box][win] = len(centres)
        best[box][win] = q[win]
    _mend_fragments(labels)
    lut = np.zeros(len(centres) + 1, dtype=np.uint16)  # 1..N again if one vanished
    kept = np.unique(labels[labels > 0])
    lut[kept] = np.arange(1, kept.size + 1)
    return lut[labels], best


def _mend_fragments(labels: np.ndarray) -> None:
    """Give every piece of a nucleus cut off from its main part (per slice) to a neighbour."""
    from skimage.measure import label

    for z in range(labels.shape[0]):
        lab = labels[z]
        comps, n = label(lab, background=0, connectivity=1, return_num=True)
        ids = np.unique(lab[lab > 0])
        if n == ids.size:
            continue
        sizes = np.bincount(comps.ravel())
        owner = np.zeros(n + 1, dtype=np.int64)
        owner[comps.ravel()] = lab.ravel()
        for c in range(1, n + 1):
            same = np.flatnonzero(owner == owner[c])
            if c == same[np.argmax(sizes[same])]:
                continue  # the largest piece keeps the id
            piece = comps == c
            ring = ndi.binary_dilation(piece) & ~piece
            around = lab[ring]
            around = around[(around > 0) & (around != owner[c])]
            lab[piece] = np.bincount(around).argmax() if around.size else 0


def make_nuclei(
    slices: int, shape: tuple[int, int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fluorescence-like nuclei (uint16) and their instance labels (uint16, 0 = background).

    As in DSB 2018: nuclei of varied size, elongation, orientation, outline and brightness,
    many in clusters of touching nuclei (sharing a border, no gap), on an uneven background.
    Each slice is a 2D field of its own, as DSB 2018's images are: every nucleus in it is whole,
    in focus and labelled (3D nuclei blurred across slices left out-of-focus neighbours visible
    but unlabelled, and tiny top sections, which no slice-by-slice model can tell apart).
    Ids are numbered 1..N over the stack.
    """
    slices, shape = _check_dims(slices, shape)
    rng = np.random.default_rng(_check_seed(seed))
    fields = [_place_nuclei(rng, shape) for _ in range(slices)]
    offsets = np.cumsum([0] + [int(lab.max()) for lab, _ in fields[:-1]])
    count = int(offsets[-1] + fields[-1][0].max())
    dtype = np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32
    pieces = [
        np.where(lab > 0, lab.astype(dtype) + dtype(o), 0)
        for (lab, _), o in zip(fields, offsets, strict=True)
    ]
    labels = np.concatenate(pieces).astype(dtype)
    q = np.concatenate([qq for _, qq in fields])
    # Brightness varies per nucleus (DNA content, staining), log-normally; chromatin texture;
    # a dome profile, dimmer at the rim, leaves a faint dip where touching nuclei meet.
    bright = np.exp(rng.normal(np.log(1200.0), 0.5, count + 1)).astype(np.float32)
    bright[0] = 0.0
    profile = np.where(labels > 0, 1.0 - 0.4 * np.minimum(q, 1.0) ** 2, 0.0)
    chromatin = 1.0 + 0.25 * _smooth_volume(rng, slices, shape, step=4, sigma_z=0.0)
    signal = bright[labels] * profile * np.clip(chromatin, 0.3, None)
    # Optical blur and out-of-focus glow, within the slice.
    signal = ndi.gaussian_filter(signal.astype(np.float32), (0.0, 1.5, 1.5))
    signal += 0.12 * ndi.uniform_filter(signal, (1, 15, 15))
    # Camera offset, smooth haze and an illumination gradient across the field.
    haze = _smooth_volume(rng, slices, shape, step=64, sigma_z=3.0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * yy + np.sin(ang) * xx) / max(shape)
    background = 100.0 + 30.0 * np.exp(0.5 * haze) + 60.0 * (ramp - ramp.min())
    illum = 1.0 + 0.3 * (ramp - ramp.mean())  # vignetting: the signal dims across the field
    # Shot noise (Gaussian: >= 100 photons a pixel) plus the camera's read noise (6 e-).
    mean = np.maximum(signal * illum + background, 0.0)
    photons = mean + np.sqrt(mean + 36.0) * rng.standard_normal(mean.shape, dtype=np.float32)
    volume = np.clip(np.round(photons), 0, 65535).astype(np.uint16)
    return volume, labels


def parse_size(text: str) -> tuple[int, int]:
    """Parse "256" as (256, 256) and "HxW" such as "256x128" as (height 256, width 128)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", str(text))
    if match is None:
        raise CellP2PError(
            f"size {text!r}: not understood; give one integer (square) or HxW such as 256x128"
        )
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) is not None else h
    if h < 1 or w < 1:
        raise CellP2PError(f"size {text!r}: height and width must be positive, e.g. 256x128")
    return h, w


def synth(
    kind: str,
    out: Path,
    slices: int,
    size: tuple[int, int],
    seed: int = 0,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write a synthetic pair ``out/volume.tif`` and ``out/labels.tif``; return their paths."""
    from cellp2p.io import write_stack  # imported late: io pulls in tifffile

    kind = str(kind).lower()
    if kind not in KINDS:
        raise CellP2PError(f"synthetic kind {kind!r}: unknown; choose one of {', '.join(KINDS)}")
    slices, size = _check_dims(slices, size)
    _check_seed(seed)
    out = Path(out)
    vol_path, lab_path = out / "volume.tif", out / "labels.tif"
    # Check both before writing either, so a refusal never leaves a half-written pair.
    for path in (vol_path, lab_path):
        if path.exists() and not force:
            raise CellP2PError(
                f"{path}: already exists; pass --force to overwrite it or choose another folder"
            )
    if kind == "em":
        volume, labels = make_em(slices, size, seed)
        spacing = EM_SPACING
    else:
        volume, labels = make_nuclei(slices, size, seed)
        spacing = NUCLEI_SPACING
    write_stack(vol_path, volume, spacing=spacing, unit="um", force=force)
    write_stack(lab_path, labels, spacing=spacing, unit="um", force=force)
    return vol_path, lab_path
