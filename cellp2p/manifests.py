"""Data manifests: named public data sets described by file name, size and hashes.

A manifest is a JSON file in ``data_manifests/`` at the repository root (or any JSON file
given by path). Schema, all keys optional unless marked required; unknown keys are errors:

``name`` (required)
    Identifier, also the sub-folder name used by :func:`fetch` (letters, digits, ``._-``).
``description``, ``source``, ``licence``
    Free text.
``citation``
    List of references (a single string is accepted).
``files`` (required)
    List of ``{role, name, shape, dtype, pixel_sha256, sha256, size, url}``. ``role`` is one
    of ``volume``, ``labels``, ``test_volume`` (each at most once); ``name`` is a bare file
    name; ``shape`` and ``dtype`` describe the decoded stack; ``pixel_sha256`` is
    :func:`pixel_sha256` of it (required). ``sha256`` and ``size`` (bytes) describe one
    reference copy of the file; ``url`` is where :func:`fetch` downloads it from (null when
    there is no public download).
``labels``
    ``{foreground, background, meaning}``: label values and what they mean.
``split``
    ``{train, val, test}``: slice (Z) indices, each a list of integers or a range string
    such as ``"0-24"`` or ``"0-9,12,20-24"`` (inclusive ranges); ``""`` or ``[]`` is empty.
``pixel_size``
    ``{z, y, x, unit}``, e.g. ``{"z": 0.05, "y": 0.004, "x": 0.004, "unit": "um"}``.
``download``
    ``{page, note}``: where a human gets the data and what to know about it.

Pixel content, not file bytes, is what identifies the data: public copies of a data set are
often re-encoded (other TIFF compression, per-slice PNGs), which changes ``sha256`` but not
``pixel_sha256``; a truncated or corrupted download changes both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.slices import MAX_SLICES, expand

# Repository root of a source checkout; for a wheel the manifests must be installed next to
# the package (site-packages/data_manifests) to be found by name.
_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = _ROOT / "data_manifests"
ENV_DATA = "CELLP2P_DATA"
ROLES = ("volume", "labels", "test_volume")
LEVELS = ("sha256", "pixels")

_TOP_KEYS = {
    "name",
    "description",
    "files",
    "labels",
    "split",
    "pixel_size",
    "source",
    "citation",
    "licence",
    "download",
}
_FILE_REQUIRED = {"role", "name", "shape", "dtype", "pixel_sha256"}
_FILE_OPTIONAL = {"sha256", "size", "url"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManifestFile:
    """One file of a data set."""

    role: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    pixel_sha256: str
    sha256: str | None = None
    size: int | None = None
    url: str | None = None


@dataclass(frozen=True)
class LabelSpec:
    """Label values of a labels file and their meaning."""

    foreground: int
    background: int
    meaning: str = ""


@dataclass(frozen=True)
class PixelSize:
    """Voxel size (z, y, x) in ``unit``."""

    z: float
    y: float
    x: float
    unit: str = "um"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) as a tuple, the order used by cellp2p.io."""
        return (self.z, self.y, self.x)


@dataclass(frozen=True)
class Manifest:
    """A validated data manifest."""

    name: str
    files: tuple[ManifestFile, ...]
    path: Path
    description: str = ""
    labels: LabelSpec | None = None
    split: dict[str, list[int]] = field(default_factory=dict)
    pixel_size: PixelSize | None = None
    source: str = ""
    citation: tuple[str, ...] = ()
    licence: str = ""
    download: dict[str, str] = field(default_factory=dict)

    def file(self, role: str) -> ManifestFile:
        """The file with this role; CellP2PError if the manifest has none."""
        for f in self.files:
            if f.role == role:
                return f
        have = ", ".join(f.role for f in self.files)
        raise CellP2PError(f"{self.path}: no file with role {role!r} (it has {have})")


# -- hashing -----------------------------------------------------------------------------------


def pixel_sha256(array: np.ndarray) -> str:
    """SHA-256 of pixel content: header ``"<dtype name>;<d0>x<d1>x...;"`` + little-endian C bytes.

    The recipe, exactly: ``a = np.asarray(array)``; byte order normalised to little endian
    (so big-endian TIFFs hash alike); header = ASCII ``f"{a.dtype.name};{'x'.join(map(str,
    a.shape))};"`` (e.g. ``"uint8;30x512x512;"``); digest = sha256(header + a.tobytes("C")).
    Files are decoded with :func:`cellp2p.io.read_stack` first, so the hash is of the
    (Z, Y, X) or (Z, C, Y, X) stack cellp2p sees, whatever the file's compression.
    """
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    header = f"{a.dtype.name};{'x'.join(str(n) for n in a.shape)};".encode("ascii")
    digest = hashlib.sha256(header)
    digest.update(np.ascontiguousarray(a).tobytes(order="C"))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- loading and validation --------------------------------------------------------------------


def list_manifests() -> list[str]:
    """Names of the manifests shipped in ``data_manifests/``."""
    if not MANIFEST_DIR.is_dir():
        return []
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))


def _manifest_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    looks_like_path = text.endswith(".json") or "/" in text or os.sep in text
    if looks_like_path or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise CellP2PError(f"{path}: no such manifest file; check the path")
        return path
    path = MANIFEST_DIR / f"{text}.json"
    if not _SAFE_NAME.fullmatch(text) or not path.is_file():
        known = ", ".join(list_manifests()) or "none installed"
        raise CellP2PError(
            f"{text}: unknown data set (known: {known}); give a manifest name or a path to a .json"
        )
    return path


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Load and validate a manifest by name (``isbi2012``) or by path to a JSON file."""
    path = _manifest_path(name_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CellP2PError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix it"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CellP2PError(f"{path}: cannot read it ({err}); check the file") from None
    return _parse_manifest(raw, path)


def _bad(path: Path, what: str) -> CellP2PError:
    return CellP2PError(f"{path}: {what}; fix the manifest (schema in cellp2p/manifests.py)")


def _expect(path: Path, where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int subclass in Python; a JSON true is never a valid count or index here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _bad(path, f"{where} must be {_kind_name(kind)}, not {json.dumps(value)}")
    if not isinstance(value, kind):
        raise _bad(path, f"{where} must be {_kind_name(kind)}, not {json.dumps(value)[:40]}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list"}
    names[dict] = "an object"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_keys(
    path: Path, where: str, obj: Mapping, allowed: set[str], required: Iterable[str] = ()
) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _bad(
            path,
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
        )
    missing = [k for k in required if k not in obj]
    if missing:
        raise _bad(path, f"{where}: missing key(s) {', '.join(missing)}")


def _safe_name(path: Path, where: str, name: Any) -> str:
    name = _expect(path, where, name, str)
    # A bare file name only: the manifest must never make fetch write outside dest/<name>/.
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise _bad(
            path, f"{where} {name!r} must be a bare name (letters, digits, '._-'; no '/' or '..')"
        )
    return name


def _parse_file(path: Path, i: int, raw: Any) -> ManifestFile:
    where = f"files[{i}]"
    _expect(path, where, raw, dict)
    _check_keys(path, where, raw, _FILE_REQUIRED | _FILE_OPTIONAL, sorted(_FILE_REQUIRED))
    role = _expect(path, f"{where}.role", raw["role"], str)
    if role not in ROLES:
        raise _bad(path, f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
    name = _safe_name(path, f"{where}.name", raw["name"])
    shape = _expect(path, f"{where}.shape", raw["shape"], list)
    if not 2 <= len(shape) <= 4 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise _bad(path, f"{where}.shape {shape} must be 2 to 4 positive integers")
    dtype = _expect(path, f"{where}.dtype", raw["dtype"], str)
    try:
        ok = np.dtype(dtype).name == dtype
    except TypeError:
        ok = False
    if not ok:
        raise _bad(path, f"{where}.dtype {dtype!r} is not a NumPy dtype name such as uint8")
    hashes = {}
    for key in ("pixel_sha256", "sha256"):
        value = raw.get(key)
        if value is None and key == "sha256":
            hashes[key] = None
            continue
        value = _expect(path, f"{where}.{key}", value, str)
        if not _HEX64.fullmatch(value):
            raise _bad(path, f"{where}.{key} must be 64 lowercase hex digits")
        hashes[key] = value
    size = raw.get("size")
    if size is not None and (_expect(path, f"{where}.size", size, int) < 0):
        raise _bad(path, f"{where}.size must be >= 0")
    url = raw.get("url")
    if url is not None:
        url = _expect(path, f"{where}.url", url, str)
        if not re.match(r"(https?|ftp)://", url):
            raise _bad(path, f"{where}.url {url!r} must start with http://, https:// or ftp://")
    return ManifestFile(
        role=role,
        name=name,
        shape=tuple(shape),
        dtype=dtype,
        pixel_sha256=hashes["pixel_sha256"],
        sha256=hashes["sha256"],
        size=size,
        url=url,
    )


def _parse_manifest(raw: Any, path: Path) -> Manifest:
    """A manifest from its JSON, every key checked (see the schema above)."""
    _expect(path, "top level", raw, dict)
    _check_keys(path, "top level", raw, _TOP_KEYS, ["name", "files"])
    name = _safe_name(path, "name", raw["name"])
    files = _parse_files(path, raw["files"])
    texts = {
        key: _expect(path, key, raw.get(key, ""), str)
        for key in ("description", "source", "licence")
    }
    citation = raw.get("citation", [])
    if isinstance(citation, str):
        citation = [citation]
    _expect(path, "citation", citation, list)
    for i, c in enumerate(citation):
        _expect(path, f"citation[{i}]", c, str)
    download: dict[str, str] = {}
    if raw.get("download") is not None:
        dl = _expect(path, "download", raw["download"], dict)
        _check_keys(path, "download", dl, {"page", "note"})
        download = {k: _expect(path, f"download.{k}", v, str) for k, v in dl.items()}
    return Manifest(
        name=name,
        files=files,
        path=path,
        description=texts["description"],
        labels=_parse_labels(path, raw.get("labels")),
        split=_parse_split(path, raw.get("split"), files),
        pixel_size=_parse_pixel_size(path, raw.get("pixel_size")),
        source=texts["source"],
        citation=tuple(citation),
        licence=texts["licence"],
        download=download,
    )


def _parse_files(path: Path, raw: Any) -> tuple[ManifestFile, ...]:
    """The ``files`` list: at least one, no role or name twice."""
    files_raw = _expect(path, "files", raw, list)
    if not files_raw:
        raise _bad(path, "files is empty")
    files = tuple(_parse_file(path, i, f) for i, f in enumerate(files_raw))
    for attr in ("role", "name"):
        values = [getattr(f, attr) for f in files]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise _bad(path, f"files: {attr} {', '.join(dupes)} appears more than once")
    return files


def _parse_labels(path: Path, raw: Any) -> LabelSpec | None:
    """The ``labels`` record: foreground and background values, what they mean."""
    if raw is None:
        return None
    lab = _expect(path, "labels", raw, dict)
    _check_keys(
        path, "labels", lab, {"foreground", "background", "meaning"}, ["foreground", "background"]
    )
    return LabelSpec(
        foreground=_expect(path, "labels.foreground", lab["foreground"], int),
        background=_expect(path, "labels.background", lab["background"], int),
        meaning=_expect(path, "labels.meaning", lab.get("meaning", ""), str),
    )


def _parse_split(path: Path, raw: Any, files: tuple[ManifestFile, ...]) -> dict[str, list[int]]:
    """The ``split``: slice indices within the volume, no slice in two parts."""
    split: dict[str, list[int]] = {}
    if raw is None:
        return split
    sp = _expect(path, "split", raw, dict)
    _check_keys(path, "split", sp, {"train", "val", "test"})
    nz = next((f.shape[0] for f in files if f.role == "volume"), MAX_SLICES)
    for key, spec in sp.items():
        try:
            split[key] = expand(spec, where=f"split.{key}", limit=nz)
        except ValueError as err:
            raise _bad(path, str(err)) from None
    seen: dict[int, str] = {}
    for key, ids in split.items():
        for i in ids:
            if i in seen:
                raise _bad(path, f"split: slice {i} is in both {seen[i]} and {key}")
            seen[i] = key
    return split


def _parse_pixel_size(path: Path, raw: Any) -> PixelSize | None:
    """The ``pixel_size`` record: positive z, y, x and a unit."""
    if raw is None:
        return None
    ps = _expect(path, "pixel_size", raw, dict)
    _check_keys(path, "pixel_size", ps, {"z", "y", "x", "unit"}, ["z", "y", "x"])
    vals = {}
    for axis in "zyx":
        v = _expect(path, f"pixel_size.{axis}", ps[axis], (int, float))
        if not v > 0:
            raise _bad(path, f"pixel_size.{axis} must be positive")
        vals[axis] = float(v)
    unit = _expect(path, "pixel_size.unit", ps.get("unit", "um"), str)
    return PixelSize(unit=unit, **vals)


# -- locating and verifying files --------------------------------------------------------------


def resolve_files(
    manifest: Manifest,
    data_dir: Path | str | None = None,
    *,
    roles: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Find the manifest's files (all, or those of ``roles``): role -> path.

    Looks in ``data_dir`` if given, else in each folder of ``$CELLP2P_DATA`` (``os.pathsep``
    separated), else in ``<repo>/../shared/data``; in each, directly or in ``<name>/``.
    """
    wanted = [manifest.file(r) for r in roles] if roles is not None else list(manifest.files)
    dirs = _search_dirs(manifest, data_dir)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for f in wanted:
        hit = next((d / f.name for d in dirs if (d / f.name).is_file()), None)
        if hit is None:
            missing.append(f.name)
        else:
            found[f.role] = hit
    if missing:
        where = ", ".join(str(d) for d in dirs)
        hint = "pass --data-dir DIR" if data_dir is None else "check --data-dir"
        raise CellP2PError(
            f"{manifest.path}: {', '.join(missing)} not found in {where}; run "
            f"`cellp2p fetch {manifest.name} --dest DIR` and then {hint} (or set {ENV_DATA})"
        )
    return found


def _pixel_problem(entry: ManifestFile, path: Path) -> str | None:
    """Why the decoded pixels of ``path`` differ from the manifest, or None if they match."""
    from cellp2p.io import read_stack  # late import: io pulls in tifffile

    try:
        data = read_stack(path).data
    except CellP2PError as err:
        return str(err).split("; ")[0]  # e.g. "<path>: cannot read it as an image (...)"
    if tuple(data.shape) != entry.shape or data.dtype.name != entry.dtype:
        found = "x".join(map(str, data.shape))
        expected = "x".join(map(str, entry.shape))
        return f"expected {expected} {entry.dtype}, found {found} {data.dtype.name}"
    got = pixel_sha256(data)
    if got != entry.pixel_sha256:
        return f"pixel_sha256 expected {entry.pixel_sha256}, found {got}"
    return None


# -- downloading -------------------------------------------------------------------------------


def fetch(
    name_or_path: str | Path, dest: Path | str, *, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Download the manifest's files into ``dest/<name>/``, verified by pixel hash.

    A file already there and matching is kept (no download) unless ``force``. Each download
    goes to a temporary name and is renamed into place only after it verifies, so the final
    path never holds a partial or wrong file. Returns role -> path of every file present.
    """
    import pooch  # late import: only fetch needs it

    manifest = load_manifest(name_or_path)
    target = Path(dest) / manifest.name
    if not any(f.url for f in manifest.files):
        raise CellP2PError(
            f"{manifest.path}: no file has a download url; get the data by hand "
            f"({manifest.download.get('page', 'see the manifest')}) and pass --data-dir"
        )
    from cellp2p.fsutil import check_folder_writable

    check_folder_writable(target)
    if target.exists() and not target.is_dir():
        raise CellP2PError(f"{target}: is a file, not a folder; choose another --dest")
    out: dict[str, Path] = {}
    # Files already there are checked before anything is downloaded or created.
    for entry in manifest.files:
        final = target / entry.name
        if final.exists() and not force:
            problem = _pixel_problem(entry, final)
            if problem:
                raise CellP2PError(
                    f"{final}: already there but does not match {manifest.path.name} "
                    f"({problem}); pass --force to download it again"
                )
            out[entry.role] = final
    wanted = [f for f in manifest.files if f.role not in out and f.url is not None]
    with _made_folder(target, bool(wanted)):
        for entry in wanted:
            out[entry.role] = _download(pooch, manifest, entry, target, progress)
    return out


@contextlib.contextmanager
def _made_folder(target: Path, needed: bool) -> Iterator[None]:
    """Create ``target`` only when something will be downloaded into it; remove the folders
    this made again when the downloads failed and left them empty."""
    made = [d for d in (target, *target.parents) if not d.exists()] if needed else []
    if needed:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CellP2PError(
                f"{target}: cannot create the folder ({err.strerror}); choose another --dest"
            ) from None
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first; only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _download(
    pooch: Any, manifest: Manifest, entry: ManifestFile, target: Path, progress: bool
) -> Path:
    final = target / entry.name
    # Keep the suffix so the temporary file decodes as the same format during verification.
    tmp = target / f".{final.stem}.{os.getpid()}.part{final.suffix}"
    tmp.unlink(missing_ok=True)
    downloader = None
    if entry.url and entry.url.startswith(("http://", "https://")):
        downloader = pooch.HTTPDownloader(progressbar=progress, timeout=60)
    logger = pooch.get_logger()
    level = logger.level
    # pooch logs the file's SHA256 as a hint to pin it; the pixel hash is what counts here.
    logger.setLevel(logging.WARNING)
    try:
        pooch.retrieve(
            entry.url,
            known_hash=None,  # bytes differ between copies; pixels are verified below
            fname=tmp.name,
            path=target,
            progressbar=progress,
            downloader=downloader,
        )
    except Exception as err:  # requests/ftplib raise many types: all mean "no file"
        tmp.unlink(missing_ok=True)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        page = manifest.download.get("page", "the data set's web page")
        raise CellP2PError(
            f"{entry.url}: download failed ({reason}); check the network, or save "
            f"{entry.name} by hand into {target} (see {page})"
        ) from None
    finally:
        logger.setLevel(level)
    problem = _pixel_problem(entry, tmp)
    if problem:
        tmp.unlink(missing_ok=True)
        raise CellP2PError(
            f"{entry.url}: downloaded {entry.name} does not match {manifest.path.name} "
            f"({problem}); deleted it: retry later or report the changed source"
        )
    os.replace(tmp, final)
    return final


# -- summaries ---------------------------------------------------------------------------------


def _search_dirs(manifest: Manifest, data_dir: Path | str | None) -> list[Path]:
    """Folders to look in, in order: each base itself, then its ``<name>/`` sub-folder."""
    if data_dir is not None:
        bases = [Path(data_dir)]
    else:
        bases = [Path(p) for p in os.environ.get(ENV_DATA, "").split(os.pathsep) if p]
        # Convenience for a checkout next to a shared data folder: <repo>/../shared/data.
        bases.append(_ROOT.parent / "shared" / "data")
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / manifest.name):
            if d not in dirs:
                dirs.append(d)
    return dirs
