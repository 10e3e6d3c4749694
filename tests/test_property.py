"""Every command with random options and random path collisions never loses a file (issue 14).

Each example builds a sandbox (a synthetic pair, a copy of one tiny trained run, a folder of the
user's, a folder of images, a bogus manifest), hashes every file in it, runs one command in this
process with random option values and paths drawn from the sandbox (output = input, output
inside an input folder, output = a run file, an existing user folder…), and asserts: exit 0, or
one ``Error:`` line on stderr (click's usage errors: exit 2), no traceback; every file that was
there is byte-identical unless the command was asked to replace that very output (``--force``,
``--resume`` of the run); and a refused command leaves nothing new behind.

``fetch`` never reaches the network: ``pooch.retrieve`` is replaced by a local copy. The demo
is shrunk (4 slices of 64x64). ``CELLP2P_SAFETY_EXAMPLES`` sets the examples per command (5);
``CELLP2P_SAFETY_RANDOM=1`` draws new ones instead of the fixed, reproducible set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tifffile
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.io import write_stack
from cellp2p.synth import make_em

EXAMPLES = int(os.environ.get("CELLP2P_SAFETY_EXAMPLES", "5"))  # per command
TINY_NET = {"depth": 2, "base": 4}
# The sandbox: every path an example may name, relative to it ("." is the sandbox itself).
PATHS = {
    "vol": "data/volume.tif",
    "lab": "data/labels.tif",
    "pred": "pred.tif",
    "data": "data",
    "run": "run",
    "run_config": "run/config.json",
    "run_last": "run/checkpoints/last.pt",
    "run_metrics": "run/metrics.jsonl",
    "mine": "mine",
    "mine_notes": "mine/notes.txt",
    "mine_config": "mine/config.json",
    "mine_tif": "mine/figure.tif",
    "imgs": "imgs",
    "img1": "imgs/img1.tif",
    "new": "new/out",
    "new_tif": "new/out.tif",
    "new_json": "new/out.json",
    "manifest": "manifest.json",
    "tiny": "tiny.json",
    "cwd": ".",
}
STDERR_PREFIXES = ("note:", "step ", "warning:", "interrupted")
TALLY: Counter[str] = Counter()  # command and exit status of the examples run (printed with -s)


@dataclass
class Invocation:
    """One drawn command: its arguments (PATHS keys as ``{key}``) and what it may replace."""

    command: str
    args: list[str]
    replaces: list[str] = field(default_factory=list)  # PATHS keys (folders: all below)

    def resolve(self, root: Path) -> list[str]:
        """The arguments with every ``{key}`` made a path in ``root``."""
        out = []
        for a in self.args:
            for key, rel in PATHS.items():
                a = a.replace("{" + key + "}", "." if rel == "." else str(root / rel))
            out.append(a)
        return out


# -- the sandbox ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sandbox every example copies: made (and its run trained) once for the module."""
    from cellp2p.manifests import pixel_sha256
    from cellp2p.train import train

    root = tmp_path_factory.mktemp("sandbox")
    vol, lab = make_em(6, (64, 64), seed=0)
    write_stack(root / PATHS["vol"], vol)
    write_stack(root / PATHS["lab"], lab)
    write_stack(root / PATHS["pred"], lab)
    cfg = TrainConfig(
        volume=str(root / PATHS["vol"]),
        labels=str(root / PATHS["lab"]),
        crop=32,
        batch_size=2,
        max_steps=2,
        eval_every=2,
        quiet=True,
        device="cpu",
        model_overrides=TINY_NET,
    )
    train(cfg, root / "run")
    mine = root / "mine"
    (mine / "panels").mkdir(parents=True)
    (mine / "panels" / "figure1.png").write_bytes(b"my figure")
    (mine / "notes.txt").write_text("years of work\n")
    (mine / "config.json").write_text('{"mine": true}\n')
    (mine / "report.md").write_text("# my report\n")
    tifffile.imwrite(mine / "figure.tif", vol[0])
    (root / "imgs").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "imgs" / f"img{i + 1}.tif", vol[i])
    entry = {"role": "volume", "name": "v.tif", "shape": list(vol.shape), "dtype": "uint8"}
    entry |= {"pixel_sha256": pixel_sha256(vol), "url": "https://example.invalid/v.tif"}
    (root / "manifest.json").write_text(json.dumps({"name": "bogus", "files": [entry]}))
    (root / "tiny.json").write_text(json.dumps({"model_overrides": TINY_NET}))
    return root


@pytest.fixture(scope="module", autouse=True)
def _tally() -> Iterator[None]:
    """Print what the examples did (visible with ``pytest -s``)."""
    yield
    print("\nproperty examples:", ", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


@pytest.fixture(scope="module")
def offline_and_small() -> Iterator[None]:
    """No network for fetch (a "download" copies the sandbox volume) and a small demo."""
    import pooch

    from cellp2p import demo

    def fake_retrieve(url, known_hash, fname, path, **kwargs):
        shutil.copyfile(Path(path).parent.parent / PATHS["vol"], Path(path) / fname)
        return str(Path(path) / fname)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pooch, "retrieve", fake_retrieve)
        mp.setattr(demo, "SYNTH_SLICES", 4)
        mp.setattr(demo, "SYNTH_SIZE", 64)
        mp.setattr(demo, "CROP", 64)
        yield


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file, "dir" for folders."""
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
    }


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# -- drawing commands ----------------------------------------------------------------------------

INTS = st.sampled_from(["1", "2", "0", "-1", "x"])
SLICES = st.sampled_from(["0-3", "4-5", "3-5", "0", "0-99999999999", "9", "a-b", ""])
FLAG = st.booleans()


def _pick(draw, name: str, values: st.SearchStrategy) -> list[str]:
    """``[name, value]`` half of the time."""
    return [name, draw(values)] if draw(st.booleans()) else []


def _keys(*keys: str) -> st.SearchStrategy:
    return st.sampled_from(keys).map(lambda k: "{" + k + "}")


@st.composite
def train_cmd(draw) -> Invocation:
    out = draw(st.sampled_from(["new", "run", "mine", "data", "imgs", "cwd", "run_config"]))
    resume, force = draw(FLAG), draw(FLAG)
    args = ["train", "--out", "{" + out + "}", "--quiet", "--device", "cpu"]
    if not resume or draw(st.booleans()):
        args += ["--volume", draw(_keys("vol", "vol", "lab", "mine_notes", "run_last", "img1"))]
        args += ["--labels", draw(_keys("lab", "lab", "vol", "mine_config"))]
    args += ["--config", "{tiny}", "--max-steps", draw(st.sampled_from(["1", "1", "2", "0"]))]
    args += ["--crop", draw(st.sampled_from(["32", "32", "16", "64", "0", "128"]))]
    args += _pick(draw, "--batch-size", st.sampled_from(["1", "2", "0", "100000000"]))
    args += _pick(draw, "--mode", st.sampled_from(["unet", "pix2pix"]))
    args += _pick(draw, "--task", st.sampled_from(["segment", "translate"]))
    args += _pick(draw, "--train-slices", SLICES) + _pick(draw, "--val-slices", SLICES)
    args += _pick(draw, "--labels-mode", st.sampled_from(["binary", "nonzero", "multiclass"]))
    args += ["--resume"] * resume + ["--force"] * force
    return Invocation("train", args, ["run"] if resume and out == "run" else [])


@st.composite
def predict_cmd(draw) -> Invocation:
    stack = draw(_keys("vol", "imgs", "data", "mine_tif", "run_last", "mine_notes"))
    out = draw(st.sampled_from(["new_tif", "vol", "img1", "data", "mine", "run_config", "new"]))
    force = draw(FLAG)
    args = ["predict", stack, "-m", draw(_keys("run", "run", "run_last", "mine_notes", "vol"))]
    args += ["-o", "{" + out + "}"] if draw(st.booleans()) else []
    args += _pick(draw, "--batch-size", INTS) + _pick(draw, "--tile", INTS)
    args += _pick(draw, "--slices", SLICES) + _pick(draw, "--overlap", st.just("0.5"))
    args += _pick(draw, "--output", st.sampled_from(["prob", "mask", "labels", "image"]))
    args += ["--quiet", "--device", "cpu"] + ["--force"] * force
    return Invocation("predict", args, [out, "pred_outputs"] if force else [])


@st.composite
def evaluate_cmd(draw) -> Invocation:
    args = ["evaluate", draw(_keys("pred", "vol", "lab", "mine_tif", "mine_notes", "imgs"))]
    args += ["--labels", draw(_keys("lab", "vol", "pred", "run_config"))]
    args += _pick(draw, "--json", _keys("new_json", "mine_config", "run_config", "vol", "mine"))
    args += _pick(draw, "--slices", SLICES) + _pick(draw, "--task", st.just("translate"))
    args += _pick(draw, "--data-range", st.sampled_from(["255", "0", "nan"]))
    return Invocation("evaluate", args)


@st.composite
def compare_cmd(draw) -> Invocation:
    runs = draw(st.lists(_keys("run", "run_last", "mine", "data"), min_size=1, max_size=2))
    args = ["compare", *runs, "--out", draw(_keys("new", "run", "mine", "data", "run_config"))]
    args += [*_pick(draw, "--slices", SLICES), "--device", "cpu"]
    args += _pick(draw, "--volume", _keys("vol", "lab", "mine_notes"))
    return Invocation("compare", args)


@st.composite
def synth_cmd(draw) -> Invocation:
    out, force = draw(st.sampled_from(["new", "data", "mine", "run", "run_config"])), draw(FLAG)
    args = ["synth", "--out", "{" + out + "}", "--slices", draw(st.sampled_from(["1", "2", "0"]))]
    args += ["--size", draw(st.sampled_from(["32", "16x24", "0", "abc", "100000"]))]
    args += _pick(draw, "--seed", st.sampled_from(["0", "-1", "7"]))
    args += _pick(draw, "--kind", st.sampled_from(["em", "nuclei"])) + ["--force"] * force
    return Invocation("synth", args, ["synth_outputs:" + out] if force else [])


@st.composite
def info_cmd(draw) -> Invocation:
    target = draw(_keys("vol", "lab", "mine_notes", "run_config", "run_last", "data", "manifest"))
    return Invocation("info", ["info", draw(st.sampled_from([target, "isbi2012", "nope"]))])


@st.composite
def demo_cmd(draw) -> Invocation:
    args = ["demo", "--out", draw(_keys("new", "new", "mine", "data", "run", "cwd", "mine_notes"))]
    args += ["--steps", draw(st.sampled_from(["1", "1", "0", "-1"]))] + ["--force"] * draw(FLAG)
    args += _pick(draw, "--manifest", st.sampled_from(["bogus", "{manifest}"]))
    return Invocation("demo", args)


@st.composite
def ablate_cmd(draw) -> Invocation:
    args = ["ablate", "--out", draw(_keys("new", "new", "mine", "data", "run")), "--quiet"]
    args += ["--volume", draw(_keys("vol", "vol", "mine_notes")), "--labels", "{lab}"]
    args += ["--max-steps", draw(st.sampled_from(["1", "0"])), "--crop", "64"]
    args += ["--variants", draw(st.sampled_from(["unet", "l1", "unet,bogus"]))]
    args += ["--batch-size", "1", "--device", "cpu"] + ["--force"] * draw(FLAG)
    return Invocation("ablate", args)


@st.composite
def fetch_cmd(draw) -> Invocation:
    force = draw(FLAG)
    args = ["fetch", draw(st.sampled_from(["{manifest}", "{mine_config}", "bogus"]))]
    args += ["--dest", draw(_keys("new", "mine", "data", "mine_notes"))] + ["--force"] * force
    return Invocation("fetch", args, ["fetched"] if force else [])


STRATEGIES = {
    "train": train_cmd(),
    "predict": predict_cmd(),
    "evaluate": evaluate_cmd(),
    "compare": compare_cmd(),
    "synth": synth_cmd(),
    "info": info_cmd(),
    "demo": demo_cmd(),
    "ablate": ablate_cmd(),
    "fetch": fetch_cmd(),
}


# -- what may change, and what is known to fail elsewhere ---------------------------------------


def _may_change(rel: str, inv: Invocation) -> bool:
    """Whether the command was asked to replace the pre-existing ``rel``."""
    for key in inv.replaces:
        if key == "pred_outputs" and rel.endswith("_pred.tif"):
            return True
        if key.startswith("synth_outputs:"):
            folder = PATHS[key.split(":", 1)[1]]
            return rel in (f"{folder}/volume.tif", f"{folder}/labels.tif")
        if key == "fetched" and rel.endswith("bogus/v.tif"):
            return True
        target = PATHS.get(key)
        if target and (rel == target or rel.startswith(target + "/")):
            return True
    return False


def _left_behind(new: list[str], root: Path, inv: Invocation) -> list[str]:
    """What a refused command left that it should not have (anything at all)."""
    return new


# -- the property --------------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("CELLP2P_SAFETY_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
@pytest.mark.parametrize("command", sorted(STRATEGIES))
def test_no_command_loses_a_file_or_shows_a_traceback(command, data, template, offline_and_small):
    inv = data.draw(STRATEGIES[command], label="invocation")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(template, Path(tmp) / "s", symlinks=True))
        before = _hashes(root)
        args = inv.resolve(root)
        with _cwd(root):
            res = CliRunner().invoke(main, args)
        after = _hashes(root)
        TALLY[f"{inv.command} exit {res.exit_code}"] += 1
        context = f"{' '.join(inv.args)}\nexit {res.exit_code}\n{res.output[-2000:]}"
        _check_result(res, context)
        changed = [p for p, h in before.items() if after.get(p) != h and h != "dir"]
        changed += [p for p, h in before.items() if h == "dir" and p not in after]
        lost = [p for p in changed if not _may_change(p, inv)]
        assert not lost, f"changed or removed {lost}: {context}"
        if res.exit_code != 0:
            new = _left_behind(sorted(set(after) - set(before)), root, inv)
            assert not new, f"refused, but left {new}: {context}"


def _check_result(res, context: str) -> None:
    """Exit 0, or one ``Error:`` line on stderr (exit 1; exit 2 for click's usage errors)."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{res.exception!r} escaped: {context}"
    )
    assert "Traceback" not in res.output, context
    assert res.exit_code in (0, 1, 2), context
    if res.exit_code == 0:
        return
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1, context
    if res.exit_code == 1:
        assert lines[-1] == errors[0], context
        others = [ln for ln in lines[:-1] if not ln.startswith(STDERR_PREFIXES)]
        assert not others, context
