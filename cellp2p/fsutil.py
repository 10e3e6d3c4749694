"""Writing files safely: output checks, and every write through a temporary name renamed into place.

An interrupted or failed write (a kill, a full disk) never leaves a file that looks finished,
and never a half-written replacement of an earlier one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError, is_disk_full


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file rather than a folder."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output(path: str | Path, force: bool = False, *, create: bool = True) -> Path:
    """Refuse to overwrite an existing file without ``force``; make the folder if needed.

    With ``create=False`` nothing is made (a command that checks its outputs before reading its
    inputs then leaves no empty folder when it refuses): the nearest existing folder above
    ``path`` must be writable, and the folder is made when the file is written.
    """
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise CellP2PError(
            f"{path}: cannot write it: {blocker} is a file, not a folder; "
            "choose another output folder"
        )
    if path.exists() and not force:
        raise CellP2PError(
            f"{path}: already exists; pass --force to overwrite it or choose another name"
        )
    if path.is_dir():
        kind = path.suffix or ".tif"
        raise CellP2PError(f"{path}: is a folder; give a file name ending in {kind}")
    if not create:
        check_folder_writable(path.parent)
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CellP2PError(
            f"{path.parent}: cannot create the output folder ({err.strerror}); "
            "choose another output folder"
        ) from None
    if not os.access(path.parent, os.W_OK):
        raise CellP2PError(f"{path.parent}: folder is not writable; choose another output folder")
    return path


def check_folder_writable(folder: str | Path) -> Path:
    """Refuse a folder (or the nearest existing folder above it) that cannot be written to."""
    folder = Path(folder)
    blocker = _file_in_the_way(folder / "x")
    if blocker is not None:
        raise CellP2PError(
            f"{folder}: cannot write it: {blocker} is a file, not a folder; choose another folder"
        )
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise CellP2PError(f"{existing}: folder is not writable; choose another output folder")
    return folder


def write_failed(path: Path, err: BaseException) -> CellP2PError:
    """One line for a write that failed part-way (disk full, quota, I/O error)."""
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    reason = " ".join(reason.split())[:160]
    if is_disk_full(err):
        return CellP2PError(
            f"{path}: could not be written ({reason}: disk full); nothing was saved: "
            "free some space or choose another output folder"
        )
    return CellP2PError(
        f"{path}: could not be written ({reason}); nothing was saved: "
        "check the output folder and try again"
    )


def free_bytes(folder: Path) -> int | None:
    """Free space of the file system holding ``folder`` (or its nearest existing parent)."""
    with contextlib.suppress(OSError, StopIteration):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        st = os.statvfs(existing)
        return st.f_bavail * st.f_frsize
    return None


def temp_name(path: Path) -> Path:
    """The temporary name ``.NAME.PID.part`` a file is written under before its rename.

    Temporary files that dead processes (a kill, a crash) left for the same name are removed.
    """
    clean_stale_parts(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): leave its file alone
    return True


def clean_stale_parts(path: Path) -> None:
    """Remove ``.NAME.PID.part`` files beside ``path`` whose process no longer runs."""
    with contextlib.suppress(OSError):
        for part in path.parent.glob(f".{path.name}.*.part"):
            pid = part.name[len(path.name) + 2 : -len(".part")]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    part.unlink()


def claim(tmp: Path, path: Path, replace: bool) -> None:
    """Rename a finished temporary file onto ``path``.

    Without ``replace`` the final name is claimed exclusively (a hard link, which fails if the
    name exists), so of two writers racing for one new output the second fails cleanly instead
    of silently replacing the first one's result.
    """
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CellP2PError(
            f"{path}: appeared while this command was writing it (another process?); "
            "nothing was replaced: choose another name or pass --force"
        ) from None
    except OSError:  # a file system without hard links: fall back to the plain rename
        if path.exists():
            raise CellP2PError(
                f"{path}: appeared while this command was writing it (another process?); "
                "nothing was replaced: choose another name or pass --force"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def to_json(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, inf/nan to None (not in strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write strict JSON atomically (temporary file, then rename); nothing is left on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CellP2PError(f"{path.parent}: cannot create the folder ({err.strerror})") from None
    write_text_atomic(path, json.dumps(to_json(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file renamed into place (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` if the block succeeds.

    On any failure the temporary file is removed and ``path`` is left as it was; an OSError
    (disk full, permissions) becomes one CellP2PError naming ``path``.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise write_failed(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


MARKER = ".cellp2p.json"
# What an output folder written before markers existed holds, per kind of folder (checked in
# this order: an old demo folder also holds a report).
_LEGACY_SIGNS = {
    "demo": ("unet/checkpoints/last.pt", "pix2pix/checkpoints/last.pt"),
    "run": ("checkpoints/last.pt", "metrics.jsonl"),
    "report": ("report.json",),
}


# Hidden files of cellp2p's own that leave a folder as good as empty: a marker whose kind cannot
# be read, and a run's lock file (opened for locking, never written).
_OWN = (MARKER, ".lock")


def folder_kind(folder: Path) -> str | None:
    """The kind of cellp2p output folder ``folder`` is (run, report, demo…), or None."""
    marker = folder / MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return str(json.loads(marker.read_text()).get("kind"))
        return None
    for kind, signs in _LEGACY_SIGNS.items():
        if all((folder / s).exists() for s in signs):
            return kind
    return None


def check_claim(
    folder: str | Path, kind: str, force: bool = False, outputs: tuple[str, ...] = ()
) -> str | None:
    """Refuse (with one line) to make ``folder`` an output folder of ``kind``; writes nothing.

    Returns the kind the folder already is (None for a new, empty or foreign folder). In a
    folder that is not already of ``kind``, an existing entry named like one of ``outputs``
    (the names the command writes) is the user's, and is refused even with ``force``.
    """
    folder = Path(folder)
    check_folder_writable(folder)
    if folder.exists() and not folder.is_dir():
        raise CellP2PError(f"{folder}: is a file, not a folder; choose another output folder")
    found = folder_kind(folder) if folder.is_dir() else None
    if found is not None and found != kind:
        raise CellP2PError(
            f"{folder}: holds a cellp2p {found}, not a {kind}; choose another folder"
        )
    if found is None and folder.is_dir() and any(p.name not in _OWN for p in folder.iterdir()):
        if not force:
            raise CellP2PError(
                f"{folder}: exists and holds files cellp2p did not write; choose a new or "
                f"empty folder, or pass --force to write the {kind} into it (nothing there is "
                "deleted)"
            )
        taken = [name for name in outputs if os.path.lexists(folder / name)]
        if taken:
            raise CellP2PError(
                f"{folder / taken[0]}: exists and is not cellp2p's; the {kind} would write "
                "there and --force never replaces files cellp2p did not write: move it or "
                "choose another folder"
            )
    return found


def claim_folder(
    folder: str | Path, kind: str, force: bool = False, outputs: tuple[str, ...] = ()
) -> Path:
    """Make ``folder`` an output folder of ``kind``, or refuse with one line.

    A command writes only into a folder that is new, empty, or already one of its own kind
    (recognised by the marker this writes); a folder of another kind is always refused, any
    other non-empty folder unless ``force`` — and even then the command only writes its own
    files into it, never deleting what it did not create (see :func:`check_claim`).
    """
    folder = Path(folder)
    check_claim(folder, kind, force, outputs)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failed(folder, err) from None
    return mark_folder(folder, kind)


def mark_folder(folder: Path, kind: str) -> Path:
    """Write the marker that says ``folder`` is a cellp2p ``kind`` folder, unless one is there."""
    if not os.path.lexists(folder / MARKER):
        write_text_atomic(folder / MARKER, json.dumps({"kind": kind}) + "\n")
    return folder
