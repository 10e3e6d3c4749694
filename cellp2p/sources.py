"""Where a run's data lives and how it is split: a manifest or a volume/labels pair, and the one
split rule (explicit slices > the manifest's split > :func:`cellp2p.slices.default_holdout`).

``train`` (through :mod:`cellp2p.dataset`) and ``compare`` both resolve data here, so a run is
compared on the slices it validated on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError
from cellp2p.slices import default_holdout, parse_slices

NO_DATA = "no data: give --volume V.tif --labels L.tif, or --manifest NAME (e.g. isbi2012)"


@dataclass(frozen=True)
class Split:
    """A declared split (a manifest's): train and val slice indices, None where not declared."""

    train: list[int] | None = None
    val: list[int] | None = None

    def fits(self, n: int) -> bool:
        """Whether every declared index is a slice of an ``n``-slice stack."""
        return all(0 <= i < n for ids in (self.train, self.val) for i in ids or ())


@dataclass(frozen=True)
class Sources:
    """A volume/labels pair on disk, the manifest it came from and the split that declares."""

    volume: Path
    labels: Path
    manifest: str | None = None
    split: Split = field(default_factory=Split)
    level: int = 0  # the pyramid level of store inputs (``--level``)

    def describe(self) -> dict[str, str]:
        """The data as a report names it: manifest (if any), volume and labels paths."""
        info = {"manifest": self.manifest} if self.manifest else {}
        return {**info, "volume": str(self.volume), "labels": str(self.labels)}


def resolve_sources(
    volume: str | Path | None = None,
    labels: str | Path | None = None,
    manifest: str | Path | None = None,
    data_dir: str | Path | None = None,
    *,
    missing: str = NO_DATA,
) -> Sources:
    """The pair named by ``--manifest`` (files found under ``data_dir``) or ``--volume/--labels``.

    ``missing`` is the error raised when neither is given in full.
    """
    if manifest and (volume or labels):
        raise CellP2PError("give either --manifest or --volume/--labels, not both")
    if manifest:
        from cellp2p.manifests import resolve_files

        man = _load_manifest(manifest)
        files = resolve_files(man, Path(data_dir) if data_dir else None, roles=("volume", "labels"))
        return Sources(files["volume"], files["labels"], str(manifest), manifest_split(man))
    if not volume or not labels:
        raise CellP2PError(missing)
    return Sources(Path(volume), Path(labels))


def _load_manifest(manifest: str | Path) -> Any:
    from cellp2p.manifests import load_manifest

    return load_manifest(manifest)


def manifest_split(man: Any) -> Split:
    """A loaded manifest's train/val split (an empty entry: not declared)."""
    split = man.split or {}
    return Split(*([int(i) for i in split[k]] if split.get(k) else None for k in ("train", "val")))


def split_slices(
    n: int,
    train: str | Sequence[int] | None = None,
    val: str | Sequence[int] | None = None,
    split: Split | None = None,
    where: str | Path = "volume",
) -> tuple[list[int], list[int]]:
    """(train, val) slice indices of an ``n``-slice stack, by the one split rule.

    Each side: the explicit selection (``--train-slices`` / ``--val-slices``), else the
    declared ``split`` (a manifest's). Without a train side the stack is split by
    :func:`default_holdout` (a given val side is kept); without a val side it is the slices
    not trained on (the last training slice when that leaves none). ``where`` names the stack
    in the error for an index outside it.
    """
    split = split or Split()
    train_ids = parse_slices(train, n) if train else split.train
    val_ids = parse_slices(val, n) if val else split.val
    if train_ids is None:
        train_ids, held_out = default_holdout(n)
        val_ids = val_ids if val_ids is not None else held_out
    if val_ids is None:
        trained = set(train_ids)
        val_ids = [i for i in range(n) if i not in trained] or train_ids[-1:]
    for ids, what in ((train_ids, "train"), (val_ids, "val")):
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise CellP2PError(f"{where}: {what} slice {bad[0]} is out of range (0-{n - 1})")
    return list(train_ids), list(val_ids)


def recorded_sources(cfg: Mapping[str, Any], missing: str = NO_DATA) -> Sources:
    """The data a run's recorded training config (a checkpoint's ``train_config``) names, at
    the pyramid level it trained on."""
    src = resolve_sources(
        cfg.get("volume"),
        cfg.get("labels"),
        cfg.get("manifest"),
        cfg.get("data_dir"),
        missing=missing,
    )
    return replace(src, level=int(cfg.get("level") or 0))


def recorded_val_slices(cfg: Mapping[str, Any], n: int) -> list[int] | None:
    """The slices a run validated on, by the split rule over its recorded config.

    None when the run chose nothing itself (no slices, no manifest split that fits an
    ``n``-slice stack): it then held out :func:`default_holdout`, which the caller applies.
    """
    train, val = cfg.get("train_slices"), cfg.get("val_slices")
    if val:
        return parse_slices(val, n)
    split = manifest_split(_load_manifest(cfg["manifest"])) if cfg.get("manifest") else Split()
    if not split.fits(n):
        split = Split()  # declared for another stack: says nothing about this one
    if not train and split == Split():
        return None
    return split_slices(n, train, None, split)[1]
