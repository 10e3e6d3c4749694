"""pix2pix data sets as they come: folders of side-by-side "AB" images (facades, maps, …).

Listing (JPEG/PNG/TIFF, grey or RGB, natural order) and validation (one clear error for an odd
width, mixed sizes, an empty folder or a file that is not an image) → the training pairs
(:func:`load_ab_data`, called by :func:`cellp2p.dataset.load_data` for ``--ab``) → prediction
of the input half to 8-bit PNGs of the same stem (:func:`predict_ab`) → scores of generated
images against the other half (:func:`evaluate_ab`), per channel through
:func:`cellp2p.scoring.evaluate_arrays`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellp2p.errors import CellP2PError

if TYPE_CHECKING:
    from cellp2p.config import TrainConfig
    from cellp2p.dataset import PairedData

AB_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Files a folder of images may hold besides them (system and editor litter).
_IGNORED = (".DS_Store", "Thumbs.db", "desktop.ini")


# -- listing and reading -----------------------------------------------------------------------


def _natural_key(name: str) -> list:
    """``2.jpg`` before ``10.jpg``."""
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_ab(path: str | Path, what: str = "--ab") -> list[Path]:
    """The AB images of a folder in natural order (or one AB image), each checked to be one."""
    path = Path(path)
    if not path.exists():
        raise CellP2PError(f"{what} {path}: no such file or folder; check the path")
    if path.is_file():
        if path.suffix.lower() not in AB_SUFFIXES:
            raise CellP2PError(f"{what} {path}: not a JPEG/PNG/TIFF image")
        return [path]
    entries = [p for p in path.iterdir() if not p.name.startswith(".") and p.name not in _IGNORED]
    files = [p for p in entries if p.is_file()]
    others = [p for p in files if p.suffix.lower() not in AB_SUFFIXES]
    if others:
        raise CellP2PError(
            f"{what} {path}: {others[0].name} is not a JPEG/PNG/TIFF image; a folder of AB "
            "images holds images only: move it out"
        )
    images = sorted(files, key=lambda p: _natural_key(p.name))
    if not images:
        dirs = sorted(p.name for p in entries if p.is_dir())
        hint = f" (it holds folders {', '.join(dirs)}: give one of them)" if dirs else ""
        raise CellP2PError(f"{what} {path}: folder holds no JPEG/PNG/TIFF images{hint}")
    return images


def read_image(path: Path) -> np.ndarray:
    """One image as (C, Y, X), C 1 (grey) or 3 (RGB; alpha dropped, palettes expanded)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = np.asarray(tifffile.imread(path))
        except Exception as err:  # tifffile raises many kinds on damaged files
            raise CellP2PError(f"{path}: cannot read it as a TIFF image ({err})") from None
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("RGB") if im.mode in ("P", "RGBA", "LA", "CMYK") else im
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError) as err:
            raise CellP2PError(f"{path}: cannot read it as an image ({err})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return np.ascontiguousarray(np.moveaxis(arr[..., :3], -1, 0))
    if arr.ndim == 2:
        return arr[None]
    raise CellP2PError(f"{path}: expected a grey or RGB 2D image, found shape {arr.shape}")


def read_ab_folder(path: str | Path, what: str = "--ab") -> tuple[list[Path], np.ndarray]:
    """Files and their images (N, C, Y, X) of one size; grey ones made RGB if any is RGB."""
    files = list_ab(path, what)
    images = [read_image(p) for p in files]
    first = images[0]
    for p, im in zip(files, images, strict=True):
        if im.shape[-1] % 2:
            raise CellP2PError(
                f"{p}: AB images need an even width (A and B side by side), found "
                f"{im.shape[-1]} px; crop one column or re-export the pair"
            )
        if im.shape[-2:] != first.shape[-2:]:
            raise CellP2PError(
                f"{what} {path}: {p.name} is {_size(im)} but {files[0].name} is {_size(first)}; "
                "the images of a folder must share one size (resize them, e.g. to 256 x 512)"
            )
        if im.dtype != first.dtype:
            raise CellP2PError(
                f"{what} {path}: {p.name} is {im.dtype} but {files[0].name} is {first.dtype}; "
                "save every image with the same bit depth"
            )
    channels = max(im.shape[0] for im in images)
    stack = np.stack(
        [np.repeat(im, channels, 0) if im.shape[0] < channels else im for im in images]
    )
    return files, stack


def _size(image: np.ndarray) -> str:
    """``256 x 512`` (height x width)."""
    return f"{image.shape[-2]} x {image.shape[-1]}"


def split_ab(images: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) halves of AB images (…, Y, 2X): A → B for AtoB, B → A for BtoA."""
    half = images.shape[-1] // 2
    a, b = images[..., :half], images[..., half:]
    return (b, a) if direction == "BtoA" else (a, b)


def match_channels(images: np.ndarray, channels: int, where: str) -> np.ndarray:
    """(N, C, Y, X) images with ``channels`` channels: grey is repeated to RGB, not the reverse."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return np.repeat(images, channels, 1)
    raise CellP2PError(
        f"{where}: {have}-channel images but the model was trained on {channels}-channel ones; "
        "give images like the training ones"
    )


# -- training data -----------------------------------------------------------------------------


def check_ab_options(cfg: TrainConfig) -> None:
    """--ab excludes the stack sources; its halves are images, so the task is translation."""
    if not cfg.ab:
        raise CellP2PError("--ab-val is the validation half of --ab: give --ab DIR too")
    given = [
        f"--{k.replace('_', '-')}"
        for k in ("volume", "labels", "manifest", "data_dir")
        if getattr(cfg, k)
    ]
    if given:
        raise CellP2PError(
            f"give either --ab (a folder of AB images) or {'/'.join(given)}, not both"
        )
    if cfg.labels_mode != "auto":
        raise CellP2PError(
            f"--labels-mode {cfg.labels_mode}: AB images are translated, not segmented; drop it"
        )
    cfg.task = "translate"  # both halves are images (the pix2pix setting)


def held_out(files: Sequence[Path], cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(train, val) indices into ``files``: --train/--val-slices, else the last fifth held out."""
    from cellp2p.sources import split_slices

    return split_slices(len(files), cfg.train_slices, cfg.val_slices, None, cfg.ab or "--ab")


def _say_validation(
    files: Sequence[Path], val_ids: Sequence[int], train_ids: Sequence[int]
) -> None:
    """Name the images held out for validation (on stderr, once under torchrun)."""
    from cellp2p import distributed

    if not distributed.is_main():
        return
    names = [files[i].name for i in val_ids]
    shown = ", ".join(names[:5]) + (f" … ({len(names)} images)" if len(names) > 5 else "")
    extra = " (also trained on: the folder has one image)" if set(val_ids) & set(train_ids) else ""
    print(
        f"note: no --ab-val: validating on {shown} of {files[0].parent}{extra}; give "
        "--ab-val DIR (e.g. the data set's val/ folder) to validate on other images",
        file=sys.stderr,
    )


def load_ab_data(cfg: TrainConfig, norms: dict[str, Any] | None = None) -> PairedData:
    """The training pairs of --ab (and --ab-val), split by --direction and normalised."""
    from cellp2p.checks import check_finite
    from cellp2p.dataset import PairedData
    from cellp2p.normalization import Normalization

    assert cfg.ab is not None
    files, images = read_ab_folder(cfg.ab, "--ab")
    check_finite(images, cfg.ab)
    if cfg.ab_val:
        val_files, val_images = read_ab_folder(cfg.ab_val, "--ab-val")
        check_finite(val_images, cfg.ab_val)
        channels = max(images.shape[1], val_images.shape[1])
        images = match_channels(images, channels, cfg.ab)
        val_images = match_channels(val_images, channels, cfg.ab_val)
        train_ids, val_ids = list(range(len(files))), list(range(len(val_files)))
    else:
        train_ids, val_ids = held_out(files, cfg)
        val_images = images[val_ids]
        _say_validation(files, val_ids, train_ids)
        images = images[train_ids]
    source, target = split_ab(images, cfg.direction)
    val_source, val_target = split_ab(val_images, cfg.direction)
    if norms:
        in_norm = Normalization.from_dict(norms["input"])
        t_norm = Normalization.from_dict(norms["target"])
    else:  # fitted on the training images only
        in_norm = Normalization.fit(source, cfg.norm_method)
        t_norm = Normalization.fit(target, cfg.norm_method)
    H, W = source.shape[-2:]
    vh, vw = val_source.shape[-2:]
    if cfg.crop > min(H, W, vh, vw):
        raise CellP2PError(
            f"--crop {cfg.crop} is larger than the halves of the AB images of {cfg.ab} "
            f"({H} x {W}{'' if (vh, vw) == (H, W) else f', --ab-val: {vh} x {vw}'}); use "
            f"--crop {min(H, W, vh, vw)} or smaller"
        )
    return PairedData(
        train_x=in_norm.apply(source),
        train_y=np.clip(t_norm.apply(target), 0.0, 1.0),
        val_x=in_norm.apply(val_source),
        val_y=np.clip(t_norm.apply(val_target), 0.0, 1.0),
        val_ids=list(val_ids),
        input_norm=in_norm,
        target_norm=t_norm,
        target_kind="image",
        classes=[],
        spacing=None,
        sources={"ab": str(cfg.ab), "ab_val": str(cfg.ab_val or "")},
    )


# -- prediction --------------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An output image (C, Y, X) as 8-bit: uint8 kept, other integers and floats rescaled."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        top = float(np.iinfo(image.dtype).max)
        return np.clip(np.rint(image.astype(np.float64) * 255 / top), 0, 255).astype(np.uint8)
    return np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def write_png(path: Path, image: np.ndarray, force: bool = False) -> Path:
    """(C, Y, X) uint8 as a grey or RGB PNG, written through a temporary file."""
    from PIL import Image

    from cellp2p.fsutil import atomic_path, check_output

    path = check_output(path, force)
    plane = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(plane)).save(tmp, format="PNG")
    return path


def ab_output_paths(files: Sequence[Path], src: Path, out: str | Path | None) -> list[Path]:
    """OUT/<stem>.png per AB image; ``-o X.png`` for one image; default ``<input>_pred/``."""
    if out is not None and Path(out).suffix.lower() == ".png":
        if len(files) > 1:
            raise CellP2PError(f"-o {out}: {len(files)} AB images need an output folder")
        return [Path(out)]
    if out is None:
        base = src.parent if src.is_file() else src
        folder = base.with_name(f"{base.name}_pred")
    else:
        folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CellP2PError(f"-o {folder}: is a file; give a folder (or a .png for one image)")
    paths = [folder / f"{p.stem}.png" for p in files]
    if len(set(paths)) < len(paths):
        raise CellP2PError(f"{src}: two images share a name stem; rename one")
    if {p.resolve() for p in paths} & {f.resolve() for f in files}:
        raise CellP2PError(f"-o {folder}: would overwrite the AB images; choose another folder")
    return paths


def predict_ab(
    inputs: Sequence[str | Path],
    model: str | Path,
    *,
    out: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    force: bool = False,
    tta: bool = False,
    test_time_dropout: bool = False,
    tile: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    quiet: bool = False,
    **_ignored: Any,
) -> list[Path]:
    """The input half of each AB image through the run; the generated half as 8-bit PNG."""
    from cellp2p.fsutil import check_output
    from cellp2p.predictor import load_predictor

    jobs = []
    for src in map(Path, inputs):
        files = list_ab(src, "predict --ab")
        jobs.append((src, files, ab_output_paths(files, src, out)))
    predictor = load_predictor(
        model, device, tta=tta, test_time_dropout=test_time_dropout, precision=precision
    )
    if predictor.task != "translate":
        raise CellP2PError(f"{model}: a segmentation run; --ab predicts with translation runs")
    direction = (predictor.train_config or {}).get("direction", "AtoB")
    for _src, _files, dsts in jobs:  # every output checked before any is written
        for dst in dsts:
            check_output(dst, force)
    written = []
    for _src, files, dsts in jobs:
        for path, dst in zip(files, dsts, strict=True):
            image = read_ab_folder(path, "predict --ab")[1]
            source = match_channels(split_ab(image, direction)[0], predictor.in_channels, str(path))
            prob = predictor.predict_slices([source[0]], tile, overlap, batch_size, str(path))[0]
            written.append(write_png(dst, to_uint8(predictor.to_output(prob, "image")), force))
            if not quiet:
                print(f"{path.name} → {dst}", file=sys.stderr)
    return written


# -- evaluation --------------------------------------------------------------------------------


def score_images(
    pred: np.ndarray, target: np.ndarray, names: Sequence[str], data_range: float | None = None
) -> dict:
    """MAE, PSNR, SSIM of each image (N, C, Y, X), the mean of its channels; and the means."""
    from cellp2p.scoring import evaluate_arrays

    rows = []
    for name, p, t in zip(names, pred, target, strict=True):
        res = evaluate_arrays(p, t, "translate", data_range=data_range)
        rows.append({"image": name, **res["mean"]})
    keys = ("mae", "psnr", "ssim")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"task": "translate", "per_image": rows, "mean": mean}


def evaluate_ab(
    generated: str | Path,
    ab: str | Path,
    *,
    direction: str = "AtoB",
    json_path: str | Path | None = None,
    echo: Callable[[str], Any] | None = print,
) -> dict:
    """Each generated ``<stem>.png`` of a folder against the target half of ``ab``'s image."""
    from cellp2p.fsutil import write_json

    generated = Path(generated)
    files, images = read_ab_folder(ab, "--ab")
    target = split_ab(images, direction)[1]
    found = {p.stem: p for p in list_ab(generated, "evaluate")} if generated.is_dir() else {}
    if generated.is_file():
        found = {files[0].stem: generated} if len(files) == 1 else {generated.stem: generated}
    missing = [p.name for p in files if p.stem not in found]
    if missing:
        raise CellP2PError(
            f"{generated}: no generated image for {missing[0]} of {ab} ({len(missing)} missing); "
            f"predict them first: cellp2p predict {ab} --ab -m RUN -o {generated}"
        )
    preds = [read_image(found[p.stem]) for p in files]
    for p, im in zip(files, preds, strict=True):
        if im.shape[-2:] != target.shape[-2:]:
            raise CellP2PError(
                f"{found[p.stem]}: is {_size(im)} but the target half of {p.name} is "
                f"{_size(target[0])}; was it predicted from {ab}?"
            )
    channels = max(target.shape[1], *(im.shape[0] for im in preds))
    pred = np.stack([match_channels(im[None], channels, str(generated))[0] for im in preds])
    target = match_channels(target, channels, str(ab))
    result = score_images(pred, target, [p.name for p in files])
    result = {"generated": str(generated), "ab": str(ab), "direction": direction, **result}
    if json_path is not None:
        write_json(json_path, result)
    if echo is not None:
        echo(format_scores(result))
    return result


def format_scores(result: dict) -> str:
    """Plain-text table: one row per image, then the means."""
    rows = [*result["per_image"], {"image": "mean", **result["mean"]}]
    width = max(len("image"), *(len(r["image"]) for r in rows))
    lines = [f"{'image':<{width}}  {'MAE':>8}  {'PSNR':>8}  {'SSIM':>6}", "-" * (width + 30)]
    for r in rows:
        psnr = "inf" if np.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(f"{r['image']:<{width}}  {r['mae']:>8.2f}  {psnr:>8}  {r['ssim']:>6.4f}")
    return "\n".join(lines)


# -- compare -----------------------------------------------------------------------------------


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths name the same folder (False when either is missing)."""
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def compare_images(
    ab: str | Path, slices: str | Sequence[int] | None, configs: Sequence[dict]
) -> tuple[list[Path], np.ndarray, list[int], str]:
    """The AB images compare scores: files, images, their indices and where the choice came from.

    ``slices`` (image indices in natural order), else, when a run trained on this folder without
    --ab-val, the images it held out; else every image of the folder.
    """
    from cellp2p.slices import parse_slices
    from cellp2p.sources import split_slices

    files, images = read_ab_folder(ab, "--ab")
    chosen = parse_slices(slices, len(files))
    if chosen is not None:
        return files, images, chosen, "--slices"
    for cfg in configs:
        if same_folder(cfg.get("ab"), ab) and not cfg.get("ab_val"):
            train = cfg.get("train_slices")
            ids = split_slices(len(files), train, cfg.get("val_slices"), None, ab)[1]
            return files, images, ids, "the images the runs held out of their --ab folder"
    return files, images, list(range(len(files))), "every image of the folder"


def check_runs(runs: Sequence[str | Path], predictors: Sequence[Any], channels: int) -> None:
    """Every run must translate images with the AB images' channels (grey → RGB is fine)."""
    for run, pred in zip(runs, predictors, strict=True):
        if pred.task != "translate":
            raise CellP2PError(f"{run}: a segmentation run; compare --ab needs translation runs")
        if pred.in_channels != channels and channels != 1:
            raise CellP2PError(
                f"{run}: trained on {pred.in_channels}-channel images but the AB images have "
                f"{channels}; compare runs on the data they were trained on"
            )


def run_images(predictor: Any, inputs: np.ndarray) -> np.ndarray:
    """(N, C, Y, X) generated images of (N, C, Y, X) input halves, in the target's dtype."""
    inputs = match_channels(inputs, predictor.in_channels, "compare --ab")
    outs = [np.asarray(predictor.to_output(predictor.predict_slice(x), "image")) for x in inputs]
    return np.stack([o if o.ndim == 3 else o[None] for o in outs])
