"""The option table (cellp2p.config): the CLI options generated from it, its choice lists, its
validation of every value and combination, and ablate's base configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click
import numpy as np
import pytest

from cellp2p import ablate as ablate_module
from cellp2p import config
from cellp2p.cli import main
from cellp2p.config import TrainConfig, flag, option_fields
from cellp2p.errors import CellP2PError

REPO = Path(__file__).resolve().parents[1]


def _params(command: str) -> dict[str, click.Parameter]:
    """The click parameters of a command by name; a name declared twice fails here."""
    params = main.commands[command].params
    names = [p.name for p in params]
    assert len(names) == len(set(names)), f"{command}: an option is declared twice"
    return {p.name: p for p in params}


def _assert_matches_table(param: click.Parameter, f, default, help_text: str) -> None:
    """One generated option against its row: flag, default, choices, help, flag-ness."""
    meta = f.metadata
    assert isinstance(param, click.Option)
    assert param.opts == [flag(f.name)]
    assert param.help == help_text
    if config.field_type(f) == "bool":
        assert param.is_flag and param.default is default
        assert param.secondary_opts == (
            [f"--no-{f.name.replace('_', '-')}"] if default or default is None else []
        )
        return
    shown = None if default is None else str(default) if meta["choices"] else default
    assert param.default == shown
    if meta["choices"]:
        assert isinstance(param.type, click.Choice)
        assert list(param.type.choices) == [str(c) for c in meta["choices"]]
    else:
        assert not isinstance(param.type, click.Choice)


# -- the CLI is generated from the table ----------------------------------------------------


def test_train_options_are_the_table():
    params = _params("train")
    for f in option_fields():
        _assert_matches_table(params[f.name], f, f.default, f.metadata["help"])
    own = set(params) - {f.name for f in option_fields()}
    assert own == {"out", "resume", "force", "config_file"}
    assert "model_overrides" not in params  # config file only


def test_ablate_options_are_the_table_with_its_own_defaults():
    params = _params("ablate")
    shared = [n for n in params if n in {f.name for f in fields(TrainConfig)}]
    assert shared == list(ablate_module.OPTIONS)
    for name, own in ablate_module.OPTIONS.items():
        f = config.table_field(name)
        default = own.get("default", f.default)
        _assert_matches_table(params[name], f, default, own.get("help", f.metadata["help"]))
    assert set(params) - set(shared) == {"out", "variants", "segmenter", "force"}


@pytest.mark.parametrize("command", ["compare", "predict"])
def test_other_commands_share_the_device_option(command):
    f = config.table_field("device")
    _assert_matches_table(_params(command)["device"], f, f.default, f.metadata["help"])


def test_evaluate_and_predict_choices_come_from_their_owners():
    from cellp2p.outputs import OUTPUTS, THRESHOLD
    from cellp2p.synth import KINDS

    evaluate = _params("evaluate")
    assert list(evaluate["task"].type.choices) == list(config.TASKS)
    assert set(evaluate["kind"].type.choices) < set(OUTPUTS)
    predict = _params("predict")
    assert list(predict["output"].type.choices) == list(OUTPUTS)
    assert predict["threshold"].default is None and str(THRESHOLD) in predict["threshold"].help
    assert list(_params("synth")["kind"].type.choices) == list(KINDS)


def test_train_help_is_grouped(runner):
    out = runner.invoke(main, ["train", "--help"]).output
    heads = [f"{g.capitalize()} options:" for g in config.GROUPS] + ["Options:"]
    at = [out.index(h) for h in heads]
    assert at == sorted(at)
    for f in option_fields():
        group = config.GROUPS.index(f.metadata["group"])
        where = out.index(f"  {flag(f.name)} ")
        assert at[group] < where < at[group + 1], f.name


def test_cli_start_up_does_not_import_torch():
    code = (
        "import sys\nfrom cellp2p.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()


# -- choice lists come from the modules that own them ---------------------------------------


def test_choice_lists_are_their_owners():
    from cellp2p.losses import GAN_MODES, IMAGE_LOSSES, SEG_LOSSES
    from cellp2p.models.blocks import UPS
    from cellp2p.models.config import PRESETS, RECEPTIVE_FIELDS
    from cellp2p.normalization import NORM_METHODS
    from cellp2p.runtime import PRECISIONS

    choices = {f.name: f.metadata["choices"] for f in fields(TrainConfig)}
    assert choices["gan_mode"] is GAN_MODES
    assert choices["loss"] == SEG_LOSSES + IMAGE_LOSSES
    assert choices["norm_method"] is NORM_METHODS
    assert choices["precision"] is PRECISIONS
    assert all(tuple(PRESETS[kind]) == choices["preset"] for kind in PRESETS)
    assert set(choices["receptive_field"]) <= set(RECEPTIVE_FIELDS)
    assert set(choices["upsample"]) <= set(UPS)
    for f in fields(TrainConfig):  # every default is one of its choices
        assert not f.metadata["choices"] or f.default in (None, *f.metadata["choices"]), f.name
        assert f.metadata["group"] in config.GROUPS, f.name


def test_best_metric_names_are_what_validation_scores():
    from cellp2p.scoring import NOT_RANKED, score_outputs

    rng = np.random.default_rng(0)
    target = (rng.random((2, 1, 16, 16)) > 0.5).astype(np.float32)
    binary = score_outputs(rng.random((2, 1, 16, 16)).astype(np.float32), target, "binary")
    assert set(config.METRICS["segment"]) <= set(binary)
    ranked = [k for k in binary if k not in NOT_RANKED]
    assert all(config._is_metric(k, "segment") for k in ranked)
    image = score_outputs(rng.random((2, 1, 16, 16)), rng.random((2, 1, 16, 16)), "image")
    assert set(image) == set(config.METRICS["translate"])
    classes = rng.integers(0, 3, (2, 1, 16, 16)).astype(np.float32)
    multi = score_outputs(rng.random((2, 3, 16, 16)), classes, "multiclass", [0, 1, 2])
    assert all(config._is_metric(k, "segment") for k in multi)
    for task, name in config.DEFAULT_BEST_METRIC.items():
        assert name in config.METRICS[task]


# -- validation: each value, each combination -----------------------------------------------

DATA = {"volume": "v.tif", "labels": "l.tif"}

BAD = {
    "mode": ({"mode": "bogus"}, "--mode 'bogus' unknown; use one of unet, pix2pix"),
    "receptive-field": ({"receptive_field": 50}, "--receptive-field 50 unknown"),
    "upsample": ({"upsample": "nearest"}, "--upsample 'nearest' unknown"),
    "preset": ({"preset": "huge"}, "--preset 'huge' unknown"),
    "crop": ({"crop": 0}, "--crop must be positive, got 0"),
    "max-steps": ({"max_steps": -1}, "--max-steps must be positive"),
    "seed": ({"seed": -1}, "--seed must be in 0..4294967295"),
    "lr": ({"lr": float("nan")}, "--lr must be a positive number"),
    "lambda": ({"lambda_l1": float("inf")}, "--lambda-l1 must be finite and >= 0"),
    "decay": ({"lr_decay_start": 1.5}, "--lr-decay-start must be a fraction"),
    "workers": ({"num_workers": -1}, "--num-workers must be 0 (load in the main process)"),
    "type": ({"crop": "big"}, "option crop should be int"),
    "BtoA-segment": ({"direction": "BtoA"}, "--direction BtoA makes images from labels"),
    "no-lambdas": (
        {"mode": "pix2pix", "lambda_l1": 0.0, "lambda_gan": 0.0},
        "leaves nothing to train",
    ),
    "pix2pix-loss": ({"mode": "pix2pix", "loss": "l1"}, "--loss l1 is the U-Net's loss"),
    "segment-l1": ({"loss": "l1"}, "--loss l1 does not fit --task segment"),
    "translate-dice": (
        {"task": "translate", "loss": "dice"},
        "--loss dice does not fit --task translate; use one of l1, l2",
    ),
    "translate-labels-mode": (
        {"task": "translate", "labels_mode": "binary"},
        "--labels-mode binary turns labels into classes",
    ),
    "elastic-no-augment": ({"elastic": True, "augment": "none"}, "drop --augment none"),
    "elastic-pix2pix-default": ({"mode": "pix2pix", "elastic": True}, "give --augment flips"),
    "segment-psnr": ({"best_metric": "psnr"}, "--best-metric psnr: not a --task segment metric"),
    "translate-dice_1": (
        {"task": "translate", "best_metric": "dice_1"},
        "not a --task translate metric; use one of mae, psnr, ssim",
    ),
    "prefixed-metric": ({"best_metric": "val_dice_1"}, "--best-metric val_dice_1"),
    "class-beyond-max": ({"best_metric": "dice_16"}, "--best-metric dice_16"),
    "manifest-and-files": ({"manifest": "isbi2012"}, "either --manifest or --volume/--labels"),
    "no-data": ({"volume": None, "labels": None}, "no training data: give --volume"),
    "volume-only": ({"labels": None}, "--volume needs --labels too"),
    "labels-only": ({"volume": None}, "--labels needs --volume too"),
    "data-dir-alone": ({"data_dir": "d"}, "--data-dir is where --manifest's files are"),
}


@pytest.mark.parametrize(("change", "words"), BAD.values(), ids=BAD.keys())
def test_bad_options_are_refused_with_a_clear_message(change, words):
    cfg = TrainConfig(**{**DATA, **change})
    with pytest.raises(CellP2PError) as err:
        cfg.validate()
    assert words in str(err.value)


GOOD = {
    "defaults": {},
    "manifest": {"volume": None, "labels": None, "manifest": "isbi2012", "data_dir": "d"},
    "BtoA": {"task": "translate", "direction": "BtoA", "loss": "l2", "best_metric": "ssim"},
    "pix2pix-l1-only": {"mode": "pix2pix", "lambda_gan": 0.0, "receptive_field": 286},
    "multiclass-metric": {"labels_mode": "multiclass", "best_metric": "dice_3"},
    "isbi-part": {"best_metric": "v_rand_split", "upsample": "resize", "lr": 1e-4},
}


@pytest.mark.parametrize("change", GOOD.values(), ids=GOOD.keys())
def test_good_options_pass(change):
    TrainConfig(**{**DATA, **change}).validate()


def test_none_defaults_resolve_by_mode_and_task():
    cfg = TrainConfig(**DATA)
    assert (cfg.learning_rate(), cfg.loss_name(), cfg.best_metric_name()) == (
        1e-3,
        "bcedice",
        "pixel_error",
    )
    p2p = TrainConfig(**DATA, mode="pix2pix", task="translate", lr=None, best_metric="mae")
    assert (p2p.learning_rate(), p2p.loss_name(), p2p.best_metric_name()) == (2e-4, "l1", "mae")
    assert TrainConfig(**DATA, task="translate").best_metric_name() == "psnr"


def test_from_dict_round_trips_and_refuses_unknown_keys():
    cfg = TrainConfig(**DATA, crop=64, model_overrides={"base": 4})
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(CellP2PError, match="unknown option"):
        TrainConfig.from_dict({"crpo": 3}, "c.json")


# -- the command line builds the config: defaults < file < flags ----------------------------


def test_train_layers_defaults_file_and_flags(runner, tmp_path, monkeypatch):
    seen = {}

    def fake_train(cfg, out, resume=False, force=False, resume_overrides=None):
        seen.update(cfg=cfg, out=out, resume=resume, overrides=resume_overrides)
        return {"step": 0}

    monkeypatch.setattr("cellp2p.train.train", fake_train)
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({**DATA, "crop": 32, "seed": 9}))
    args = ["train", "--config", str(conf), "--out", str(tmp_path / "r"), "--seed", "3"]
    res = runner.invoke(main, [*args, "--receptive-field", "16", "--augment", "none"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.crop, cfg.seed, cfg.receptive_field, cfg.augment) == (32, 3, 16, "none")
    assert cfg.batch_size == TrainConfig.batch_size  # the table's default
    assert seen["overrides"] == {"seed": 3, "receptive_field": 16, "augment": "none"}


def test_ablate_cli_passes_one_base_config(runner, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ablate_module, "ablate", lambda base, **kw: seen.update(base=base, **kw))
    args = ["ablate", "--volume", "v.tif", "--labels", "l.tif", "--out", str(tmp_path)]
    res = runner.invoke(main, [*args, "--direction", "BtoA", "--variants", "unet,l1"])
    assert res.exit_code == 0, res.output
    base = ablate_module.base_config(seen["base"])
    assert seen["variants"] == ["unet", "l1"]
    assert (base["task"], base["max_steps"], base["eval_every"]) == ("translate", 1000, 100)
    assert set(seen["base"]) == set(ablate_module.OPTIONS)


# -- ablate's base configuration ------------------------------------------------------------


def test_ablate_base_from_a_dict_or_a_config():
    base = ablate_module.base_config({"volume": Path("v.tif")}, labels="l.tif", max_steps=50)
    assert base["volume"] == "v.tif" and base["eval_every"] == 5 and base["task"] == "segment"
    from_cfg = ablate_module.base_config(TrainConfig(**DATA, loss="dice", max_steps=20))
    assert from_cfg["eval_every"] == TrainConfig.eval_every  # a config's own value is kept
    configs = ablate_module.variant_configs(from_cfg)
    assert {c.augmentation() for c in configs.values()} == {"full"}  # U-Net and pix2pix alike
    assert configs["unet"].loss == "dice"
    assert {c.loss for n, c in configs.items() if n != "unet"} == {None}


def test_ablate_checks_every_variant_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("cellp2p.train.train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(CellP2PError, match="--crop must be positive"):
        ablate_module.ablate(DATA, out=tmp_path, crop=0, echo=None)
    with pytest.raises(CellP2PError, match="--variants: unknown"):
        ablate_module.ablate(DATA, out=tmp_path, variants=["l2"], echo=None)
    with pytest.raises(CellP2PError, match="unknown option"):
        ablate_module.ablate(DATA, out=tmp_path, crpo=3, echo=None)


def test_augmentation_recipes_and_the_runs_recorded_before_them():
    assert TrainConfig(mode="unet").augmentation() == "full"
    assert TrainConfig(mode="pix2pix").augmentation() == "none"  # measured best on ISBI
    assert TrainConfig(mode="pix2pix", augment="full").augmentation() == "full"
    # config.json / checkpoints written when --augment was a flag: true = full, false = none
    assert TrainConfig.from_dict({"augment": True}).augment == "full"
    assert TrainConfig.from_dict({"augment": False}).augment == "none"


@pytest.mark.parametrize(
    ("recipe", "names"),
    [
        ("full", ["RandFlipd", "RandFlipd", "RandRotate90d", "RandScaleIntensityd",
                  "RandShiftIntensityd"]),
        ("flips", ["RandFlipd"]),
        ("none", []),
    ],
)  # fmt: skip
def test_each_augmentation_recipe_is_its_transforms(recipe, names):
    from cellp2p.dataset import make_augment

    cfg = TrainConfig(mode="pix2pix", augment=recipe)
    assert [type(t).__name__ for t in make_augment(cfg, "binary").transforms] == names
    cfg.elastic = recipe != "none"
    elastic = [type(t).__name__ for t in make_augment(cfg, "binary").transforms]
    assert ("Rand2DElasticd" in elastic) == (recipe != "none")
