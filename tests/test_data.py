"""Data manifests: validation, resolution, verification, fetch (local HTTP only), info."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cellp2p import manifests
from cellp2p.errors import CellP2PError
from cellp2p.info import info
from cellp2p.io import write_stack
from cellp2p.manifests import (
    fetch,
    file_sha256,
    list_manifests,
    load_manifest,
    pixel_sha256,
    resolve_files,
)
from cellp2p.synth import make_em

REPO = Path(__file__).resolve().parent.parent
ISBI = REPO.parent / "shared" / "data" / "isbi2012"
needs_isbi = pytest.mark.skipif(
    not (ISBI / "train-volume.tif").is_file(), reason=f"ISBI 2012 data not at {ISBI}"
)


# -- helpers -----------------------------------------------------------------------------------


def _file_entry(role: str, path: Path, url: str | None = None) -> dict:
    from cellp2p.io import read_stack

    arr = read_stack(path).data
    return {
        "role": role,
        "name": path.name,
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "pixel_sha256": pixel_sha256(arr),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "url": url,
    }


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A small synthetic pair in tmp_path/src and a manifest for it (no URLs)."""
    src = tmp_path / "src"
    vol, lab = make_em(3, (24, 20), seed=4)
    write_stack(src / "vol.tif", vol)
    write_stack(src / "lab.tif", lab)
    manifest = {
        "name": "tiny",
        "description": "test data",
        "files": [
            _file_entry("volume", src / "vol.tif"),
            _file_entry("labels", src / "lab.tif"),
        ],
        "labels": {"foreground": 255, "background": 0, "meaning": "255 = interior"},
        "split": {"train": "0-1", "val": [2]},
        "pixel_size": {"z": 0.05, "y": 0.004, "x": 0.004, "unit": "um"},
    }
    return _write_json(tmp_path / "tiny.json", manifest), src


# -- manifests ---------------------------------------------------------------------------------


def test_shipped_manifests_load() -> None:
    assert "isbi2012" in list_manifests()
    m = load_manifest("isbi2012")
    assert m.name == "isbi2012"
    assert [f.role for f in m.files] == ["volume", "labels", "test_volume"]
    assert m.split["train"] == list(range(25)) and m.split["val"] == list(range(25, 30))
    assert m.pixel_size is not None and m.pixel_size.spacing == (0.05, 0.004, 0.004)
    assert m.labels is not None and (m.labels.foreground, m.labels.background) == (255, 0)
    assert all(f.shape == (30, 512, 512) and f.dtype == "uint8" for f in m.files)
    assert any("Cardona" in c for c in m.citation)


def test_manifest_by_path(tiny: tuple[Path, Path]) -> None:
    path, _ = tiny
    m = load_manifest(str(path))
    assert m.name == "tiny" and m.path == path
    assert m.split == {"train": [0, 1], "val": [2]}


def _mutated(path: Path, change) -> Path:
    obj = json.loads(path.read_text())
    change(obj)
    return _write_json(path.with_name("bad.json"), obj)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(colour="red"), "unknown key"),
        (lambda m: m["files"][0].update(md5="0" * 32), "unknown key"),
        (lambda m: m["files"][0].update(name="../evil.tif"), "bare name"),
        (lambda m: m["files"][0].update(name="sub/evil.tif"), "bare name"),
        (lambda m: m["files"][0].update(name="..\\evil.tif"), "bare name"),
        (lambda m: m.update(name="../up"), "bare name"),
        (lambda m: m["files"][0].update(role="mask"), "role"),
        (lambda m: m["files"][1].update(role="volume"), "more than once"),
        (lambda m: m["files"][0].update(shape="3x24x20"), "shape"),
        (lambda m: m["files"][0].update(size="12"), "size"),
        (lambda m: m["files"][0].update(pixel_sha256="abc"), "hex"),
        (lambda m: m["files"][0].pop("pixel_sha256"), "missing"),
        (lambda m: m["files"][0].update(dtype="int"), "dtype"),
        (lambda m: m["files"][0].update(url="file:///etc/passwd"), "url"),
        (lambda m: m.update(split={"train": "0-2", "val": [2]}), "both"),
        (lambda m: m.update(split={"train": "0-9"}), "beyond"),
        (lambda m: m.update(split={"train": "two"}), "split"),
        (lambda m: m.update(pixel_size={"z": 0, "y": 1, "x": 1}), "positive"),
        (lambda m: m.update(labels={"foreground": True, "background": 0}), "integer"),
        (lambda m: m.update(files=[]), "empty"),
    ],
)
def test_bad_manifests_raise(tiny: tuple[Path, Path], change, message: str) -> None:
    bad = _mutated(tiny[0], change)
    with pytest.raises(CellP2PError, match=message) as err:
        load_manifest(str(bad))
    assert "bad.json" in str(err.value)


def test_invalid_json_and_unknown_name(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",')
    with pytest.raises(CellP2PError, match=r"broken\.json.*line"):
        load_manifest(str(broken))
    with pytest.raises(CellP2PError, match="unknown data set"):
        load_manifest("no-such-dataset")
    with pytest.raises(CellP2PError, match="no such manifest"):
        load_manifest(str(tmp_path / "missing.json"))


def test_pixel_sha256_recipe() -> None:
    import hashlib

    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    expected = hashlib.sha256(b"uint16;3x4;" + a.astype("<u2").tobytes()).hexdigest()
    assert pixel_sha256(a) == expected
    assert pixel_sha256(a.astype(">u2")) == expected  # byte order does not matter
    assert pixel_sha256(np.asfortranarray(a)) == expected  # memory layout does not matter
    assert pixel_sha256(a.reshape(4, 3)) != expected  # shape does
    assert pixel_sha256(a.astype(np.uint32)) != expected  # dtype does


def verify_files(m, paths: dict, level: str = "sha256") -> None:
    """Each resolved file matches its manifest entry: file bytes, or decoded pixels."""
    from cellp2p.io import read_stack

    entries = {f.role: f for f in m.files}
    for role, path in paths.items():
        entry = entries[role]
        if level == "sha256" and entry.sha256:
            assert file_sha256(path) == entry.sha256, path
        else:
            assert pixel_sha256(read_stack(path).data) == entry.pixel_sha256, path


# -- resolve and verify ------------------------------------------------------------------------


def test_resolve_direct_subfolder_and_env(tiny, tmp_path: Path, monkeypatch) -> None:
    path, src = tiny
    m = load_manifest(str(path))
    assert resolve_files(m, src) == {"volume": src / "vol.tif", "labels": src / "lab.tif"}
    nested = tmp_path / "store"
    (nested / "tiny").mkdir(parents=True)
    for name in ("vol.tif", "lab.tif"):
        (nested / "tiny" / name).write_bytes((src / name).read_bytes())
    assert resolve_files(m, nested)["volume"] == nested / "tiny" / "vol.tif"
    monkeypatch.setenv("CELLP2P_DATA", str(nested))
    assert resolve_files(m)["labels"] == nested / "tiny" / "lab.tif"
    assert resolve_files(m, roles=["labels"]) == {"labels": nested / "tiny" / "lab.tif"}


def test_resolve_missing_says_where_and_how(tiny, tmp_path: Path, monkeypatch) -> None:
    m = load_manifest(str(tiny[0]))
    monkeypatch.delenv("CELLP2P_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CellP2PError, match="cellp2p fetch tiny --dest") as err:
        resolve_files(m, empty)
    assert str(empty) in str(err.value) and "vol.tif" in str(err.value)


@needs_isbi
def test_isbi_manifest_verifies_against_shared_copy() -> None:
    m = load_manifest("isbi2012")
    paths = resolve_files(m, ISBI)
    assert set(paths) == {"volume", "labels", "test_volume"}
    verify_files(m, paths, level="sha256")
    verify_files(m, paths, level="pixels")


# -- fetch over a local HTTP server ------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch) -> Iterator[tuple[str, Path]]:
    """(base url, served folder) of an HTTP server on 127.0.0.1; never the internet."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _served_manifest(tmp_path: Path, base: str, served: Path) -> Path:
    vol, lab = make_em(2, (20, 16), seed=9)
    write_stack(served / "v.tif", vol, force=True)
    write_stack(served / "l.tif", lab, force=True)
    manifest = {
        "name": "served",
        "files": [
            _file_entry("volume", served / "v.tif", f"{base}/v.tif"),
            _file_entry("labels", served / "l.tif", f"{base}/l.tif"),
        ],
        "download": {"page": base, "note": "test server"},
    }
    return _write_json(tmp_path / "served.json", manifest)


def test_fetch_downloads_verifies_and_skips_existing(tmp_path: Path, server) -> None:
    base, served = server
    mpath = _served_manifest(tmp_path, base, served)
    dest = tmp_path / "dest"
    paths = fetch(str(mpath), dest, progress=False)
    assert paths == {"volume": dest / "served" / "v.tif", "labels": dest / "served" / "l.tif"}
    assert sorted(p.name for p in (dest / "served").iterdir()) == ["l.tif", "v.tif"]
    verify_files(load_manifest(str(mpath)), paths, level="sha256")
    # Re-fetch is a no-op: with the served files gone it still succeeds, untouched.
    stamp = paths["volume"].stat().st_mtime_ns
    for p in served.iterdir():
        p.unlink()
    assert fetch(str(mpath), dest, progress=False) == paths
    assert paths["volume"].stat().st_mtime_ns == stamp


def test_fetch_rejects_corrupt_download_and_leaves_nothing(tmp_path: Path, server) -> None:
    base, served = server
    mpath = _served_manifest(tmp_path, base, served)
    # Same size, other pixels: a plausible silent corruption.
    vol, _ = make_em(2, (20, 16), seed=10)
    (served / "v.tif").unlink()
    write_stack(served / "v.tif", vol)
    dest = tmp_path / "dest"
    with pytest.raises(CellP2PError, match=r"v\.tif.*does not match"):
        fetch(str(mpath), dest, progress=False)
    assert not (dest / "served").exists()  # the folder made for the failed download is removed
    # A truncated file cannot even be decoded: also refused, also removed.
    raw = (served / "l.tif").read_bytes()
    (served / "v.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CellP2PError, match="does not match"):
        fetch(str(mpath), dest, progress=False)
    assert not (dest / "served").exists()


def test_fetch_http_error_and_existing_mismatch(tmp_path: Path, server) -> None:
    base, served = server
    mpath = _served_manifest(tmp_path, base, served)
    dest = tmp_path / "dest"
    (served / "l.tif").unlink()
    with pytest.raises(CellP2PError, match="download failed"):
        fetch(str(mpath), dest, progress=False)
    assert not (dest / "served" / "l.tif").exists()
    # A wrong file already at the destination is neither trusted nor silently replaced...
    (dest / "served" / "v.tif").write_bytes(b"not a tiff")
    with pytest.raises(CellP2PError, match="--force"):
        fetch(str(mpath), dest, progress=False)
    # ...but --force downloads it again.
    _served_manifest(tmp_path, base, served)
    paths = fetch(str(mpath), dest, force=True, progress=False)
    verify_files(load_manifest(str(mpath)), paths, level="pixels")


# -- info --------------------------------------------------------------------------------------


def test_info_on_synthetic_stack(tiny) -> None:
    _, src = tiny
    text = info(str(src / "lab.tif"))
    assert "3 x 24 x 20" in text and "uint8" in text
    assert "0, 255" in text  # few unique values: listed
    folder = info(str(src))
    assert "vol.tif" in folder and "lab.tif" in folder


def test_info_on_manifest_reports_status(tiny, monkeypatch) -> None:
    path, src = tiny
    monkeypatch.setenv("CELLP2P_DATA", str(src))
    text = info(str(path))
    assert "tiny" in text and "found" in text and "vol.tif" in text
    monkeypatch.setenv("CELLP2P_DATA", str(src / "nowhere"))
    monkeypatch.setattr(manifests, "_ROOT", src / "nowhere")
    assert "missing" in info(str(path))


def test_info_unknown_target() -> None:
    with pytest.raises(CellP2PError):
        info("no-such-file-or-dataset")


@needs_isbi
def test_info_on_isbi_volume() -> None:
    text = info(str(ISBI / "train-volume.tif"))
    assert "30 x 512 x 512" in text and "uint8" in text
    assert "2 values: 0, 255" in info(str(ISBI / "train-labels.tif"))
