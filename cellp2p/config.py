"""Every option of a training run: one table (default, group, choices, help) and its validation.

Each ``TrainConfig`` field is one row: its default, and in ``field(metadata=...)`` the help
group (data / model / optimisation / run), the help text, the choice list (taken from the module
that owns it) and the valid range. The options of ``cellp2p train`` and ``cellp2p ablate`` are
generated from these rows, so a default, a choice list or a help string exists once.
``TrainConfig.validate`` checks every value and every combination, once, before a run reads or
writes anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError
from cellp2p.losses import GAN_MODES, IMAGE_LOSSES, SEG_LOSSES
from cellp2p.manifests import ENV_DATA
from cellp2p.models.blocks import DECODER_UPS
from cellp2p.models.config import PRESETS, GeneratorConfig, UNetConfig
from cellp2p.normalization import NORM_METHODS
from cellp2p.runtime import DEVICES, PRECISIONS, check_device

MODES = ("unet", "pix2pix")
TASKS = ("segment", "translate")
DIRECTIONS = ("AtoB", "BtoA")
LABEL_MODES = ("auto", "binary", "nonzero", "multiclass", "instances")
INSTANCE_TARGETS = ("boundary", "separated")
# Measured best for the U-Net (benchmarks/RESULTS.md); pix2pix learns images, not classes.
DEFAULT_INSTANCE_TARGET = {"unet": "boundary", "pix2pix": "separated"}
# Training augmentation. pix2pix: none; at equal work on ISBI (300 steps, seeds 0 and 1) its
# cGAN reached val pixel error 0.097-0.098 without, 0.115-0.134 with flips of both axes or the
# full set, the plain flips script 0.102-0.103 (benchmarks/RESULTS.md).
AUGMENTS = ("full", "flips", "none")
DEFAULT_AUGMENT = {"unet": "full", "pix2pix": "none"}
MAX_CLASSES = 16
GROUPS = ("data", "model", "optimisation", "run")

PRESET_NAMES = tuple(PRESETS["unet"])  # every network kind has the same three presets
UPSAMPLES = DECODER_UPS
LOSSES = SEG_LOSSES + IMAGE_LOSSES
TASK_LOSSES = {"segment": SEG_LOSSES, "translate": IMAGE_LOSSES}
# The PatchGAN sizes of the pix2pix paper's Table 3: PixelGAN, two PatchGANs, ImageGAN.
PATCH_SIZES = (1, 16, 70, 286)

# What a None option means: the default that depends on the mode or the task.
DEFAULT_LR = {"unet": 1e-3, "pix2pix": 2e-4}
DEFAULT_LOSS = {"segment": "bcedice", "translate": "l1"}
DEFAULT_BEST_METRIC = {"segment": "pixel_error", "translate": "psnr"}
# Validation metrics that can choose best.pt: the names cellp2p.scoring.score_outputs returns
# (multi-class segmentation: pixel_error and dice_<k>/iou_<k> of each class k).
METRICS = {
    "segment": (
        "pixel_error",
        "dice_0",
        "dice_1",
        "iou_0",
        "iou_1",
        "v_rand",
        "v_info",
        "ap_50",
        "ap_75",
        "ap_mean",
        "rand_error_dense",
        "v_rand_best",
        "v_info_best",
    ),
    "translate": ("mae", "psnr", "ssim"),
}
_METRIC_PARTS = ("v_rand_split", "v_rand_merge", "v_info_split", "v_info_merge")
# model_overrides limits, checked before any network is built: layers (building millions of
# them takes long even without memory) and parameters (counted on the meta device).
MAX_LAYERS = 16
MAX_PARAMETERS = 2**31
# What --resume may not change: it defines the networks or the data they learn from.
RESUME_FIXED = (
    "mode",
    "task",
    "direction",
    "preset",
    "upsample",
    "model_overrides",
    "unconditional",
    "receptive_field",
    "volume",
    "labels",
    "manifest",
    "data_dir",
    "ab",
    "ab_val",
    "labels_mode",
    "norm_method",
    "train_slices",
    "val_slices",
    "level",
)


@dataclass(frozen=True)
class Bound:
    """A numeric option's valid range, and how an error message words it."""

    test: Callable[[Any], bool]
    text: str


POSITIVE = Bound(lambda v: v > 0, "positive")
POSITIVE_FINITE = Bound(lambda v: math.isfinite(v) and v > 0, "a positive number")
NON_NEGATIVE = Bound(lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
FRACTION = Bound(lambda v: 0 <= v <= 1, "a fraction of the run in [0, 1]")
SEED = Bound(lambda v: 0 <= v < 2**32, f"in 0..{2**32 - 1}")
WORKERS = Bound(lambda v: v >= 0, "0 (load in the main process) or more")


def _meta(
    group: str,
    help: str,
    *,
    choices: tuple = (),
    bound: Bound | None = None,
    path: bool = False,
    cli: bool = True,
) -> dict[str, Any]:
    """The command-line half of a row: help group and text, choices, valid range.

    ``path``: the option names a file or folder; ``cli=False``: config file only.
    """
    return {
        "group": group,
        "help": help,
        "choices": choices,
        "bound": bound,
        "path": path,
        "cli": cli,
    }


def _opt(default: Any, group: str, help: str, **kwargs: Any) -> Any:
    """One row of the table: a dataclass field with its command-line metadata."""
    return field(default=default, metadata=_meta(group, help, **kwargs))


def _pairs(table: Mapping[str, Any]) -> str:
    """``{"unet": 0.001, ...}`` as ``unet: 0.001, ...`` for a help text."""
    return ", ".join(
        f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in table.items()
    )


# Presets whose decoder upsamples otherwise than the dataclass default (course U-Net: resize).
_UP_EXCEPTIONS = [
    f"{name} {label} {up}"
    for kind, label, base in (
        ("unet", "U-Net", UNetConfig.up),
        ("generator", "G", GeneratorConfig.up),
    )
    for name in PRESET_NAMES
    if (up := PRESETS[kind][name].get("up", base)) != base
]
_UPSAMPLE_HELP = (
    "Decoder upsampling: transposed conv, or resize + conv (no checkerboard artefacts) "
    f"[the preset's: {', '.join([UNetConfig.up, *_UP_EXCEPTIONS])}]."
)
_BEST_METRIC_HELP = (
    f"Validation metric that chooses best.pt [{_pairs(DEFAULT_BEST_METRIC)}]; segment: "
    f"{', '.join(METRICS['segment'])} (multiclass: dice_<k>, iou_<k>); translate: "
    f"{', '.join(METRICS['translate'])}."
)


@dataclass
class TrainConfig:
    """Every option of a training run; saved in config.json and in every checkpoint."""

    mode: str = _opt(
        "unet",
        "model",
        "U-Net baseline (supervised loss) or pix2pix cGAN (adversarial + λ·L1).",
        choices=MODES,
    )
    task: str = _opt(
        "segment", "data", "Labels as classes, or the target as an image.", choices=TASKS
    )
    direction: str = _opt(
        "AtoB",
        "data",
        "BtoA learns volume from labels (synthetic images).",
        choices=DIRECTIONS,
    )
    preset: str = _opt("small", "model", "Network size.", choices=PRESET_NAMES)
    volume: str | None = _opt(None, "data", "Input stack (TIFF/PNG/folder).", path=True)
    labels: str | None = _opt(
        None,
        "data",
        "Target stack: labels (segment) or the second modality (translate).",
        path=True,
    )
    manifest: str | None = _opt(None, "data", "Data manifest name or JSON path (uses its split).")
    data_dir: str | None = _opt(
        None, "data", f"Where the manifest's files are (default: ${ENV_DATA}).", path=True
    )
    ab: str | None = _opt(
        None,
        "data",
        "Folder of pix2pix AB images (A | B side by side; JPEG/PNG/TIFF); --direction picks "
        "the input half. Trains translation.",
        path=True,
    )
    ab_val: str | None = _opt(
        None, "data", "Validation AB images [the last fifth of --ab, held out].", path=True
    )
    train_slices: str | None = _opt(None, "data", "Training slices, e.g. 0-24 or 0,2,4-9.")
    val_slices: str | None = _opt(None, "data", "Validation slices, e.g. 25-29.")
    level: int = _opt(
        0, "data", "Pyramid level of OME-Zarr --volume/--labels (stores only).", bound=NON_NEGATIVE
    )
    labels_mode: str = _opt(
        "auto",
        "data",
        "How labels become classes (segment): nonzero = foreground is label > 0.",
        choices=LABEL_MODES,
    )
    instance_target: str | None = _opt(
        None,
        "data",
        "What instance labels train: boundary = background / interior / boundary classes "
        "(U-Net only), or the separated foreground (touching pixels cut) "
        f"[{_pairs(DEFAULT_INSTANCE_TARGET)}].",
        choices=INSTANCE_TARGETS,
    )
    border_weights: bool | None = _opt(
        None,
        "data",
        "U-Net paper border weight map in the loss [on for instance labels, off for binary].",
    )
    border_w0: float = _opt(10.0, "data", "Border weight w0 (U-Net paper: 10).", bound=NON_NEGATIVE)
    border_sigma: float = _opt(
        5.0, "data", "Border weight width sigma in px (U-Net paper: 5).", bound=POSITIVE_FINITE
    )
    border_class_balance: bool = _opt(
        True, "data", "Class-balancing term w_c in the border weight map."
    )
    max_steps: int | None = _opt(
        None, "optimisation", "Number of optimizer steps [one epoch].", bound=POSITIVE
    )
    epochs: int | None = _opt(
        None,
        "optimisation",
        "Epochs (an epoch covers the training slices once); --max-steps wins.",
        bound=POSITIVE,
    )
    batch_size: int = _opt(
        4,
        "optimisation",
        "Crops per step and process (under torchrun a step trains on W × this).",
        bound=POSITIVE,
    )
    crop: int = _opt(256, "data", "Training crop size.", bound=POSITIVE)
    lr: float | None = _opt(
        None, "optimisation", f"Learning rate [{_pairs(DEFAULT_LR)}].", bound=POSITIVE_FINITE
    )
    lr_decay_start: float = _opt(
        0.5,
        "optimisation",
        "Fraction of the run after which the lr decays linearly to 0.",
        bound=FRACTION,
    )
    loss: str | None = _opt(
        None, "optimisation", f"U-Net loss [{_pairs(DEFAULT_LOSS)}].", choices=LOSSES
    )
    lambda_l1: float = _opt(
        100.0, "optimisation", "pix2pix L1 weight (0: GAN only).", bound=NON_NEGATIVE
    )
    lambda_gan: float = _opt(
        1.0, "optimisation", "pix2pix adversarial weight (0: L1 only).", bound=NON_NEGATIVE
    )
    gan_mode: str = _opt("vanilla", "optimisation", "Adversarial objective.", choices=GAN_MODES)
    unconditional: bool = _opt(False, "model", "D sees the output only (GAN, not cGAN).")
    receptive_field: int = _opt(
        70, "model", "PatchGAN receptive field in pixels.", choices=PATCH_SIZES
    )
    upsample: str | None = _opt(None, "model", _UPSAMPLE_HELP, choices=UPSAMPLES)
    eval_every: int = _opt(100, "run", "Validate and checkpoint every N steps.", bound=POSITIVE)
    best_metric: str | None = _opt(None, "run", _BEST_METRIC_HELP)
    augment: str | None = _opt(
        None,
        "data",
        "full: random flips of both axes, 90° rotations and intensity jitter; flips: random "
        "horizontal flips only (with --jitter: the pix2pix paper's recipe); none "
        f"[{_pairs(DEFAULT_AUGMENT)}: measured best at equal work].",
        choices=AUGMENTS,
    )
    elastic: bool = _opt(
        False, "data", "Elastic deformation (U-Net paper), with the --augment transforms."
    )
    jitter: bool = _opt(False, "data", "pix2pix resize-286/crop-256 jitter.")
    norm_method: str = _opt(
        "percentile",
        "data",
        "Intensity normalisation, fitted on the training slices and kept in the checkpoint.",
        choices=NORM_METHODS,
    )
    seed: int = _opt(0, "run", "Random seed.", bound=SEED)
    device: str = _opt(
        "auto", "run", f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]} (cuda:N for one GPU)."
    )
    precision: str = _opt(
        "auto",
        "run",
        "auto: bf16 where the device has bf16 matrix units (CUDA GPUs, CPUs with AMX), else fp32.",
        choices=PRECISIONS,
    )
    deterministic: bool = _opt(False, "run", "Deterministic kernels where possible.")
    num_workers: int = _opt(0, "run", "Data-loading worker processes.", bound=WORKERS)
    quiet: bool = _opt(False, "run", "Plain log lines instead of progress bars.")
    sync_bn: bool = _opt(
        False, "run", "Under torchrun on GPUs: BatchNorm statistics over all processes' crops."
    )
    model_overrides: dict = field(
        default_factory=dict,
        metadata=_meta(
            "model", 'Network fields changed from the preset, e.g. {"base": 16}.', cli=False
        ),
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from JSON, refusing unknown keys and wrong types."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CellP2PError(
                f"{source}: unknown option(s) {', '.join(unknown)}; check the spelling"
            )
        out = cls()
        for key, value in d.items():
            if key == "augment" and isinstance(value, bool):  # runs before it was a choice
                value = "full" if value else "none"
            _check_type(known[key].name, str(known[key].type), value, source)
            setattr(out, key, value)
        return out

    def validate(self) -> None:
        """Every value and every combination, before anything is read or written."""
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, str(f.type), value, "options")
            choices, bound = f.metadata["choices"], f.metadata["bound"]
            if value is None:
                continue
            if choices and value not in choices:
                raise CellP2PError(
                    f"{flag(f.name)} {value!r} unknown; use one of {', '.join(map(str, choices))}"
                )
            if bound and not bound.test(value):
                raise CellP2PError(f"{flag(f.name)} must be {bound.text}, got {value}")
        check_device(self.device)
        self._check_sources()
        self._check_combinations()
        if self.model_overrides:
            self._check_model_size()

    def _check_model_size(self) -> None:
        """``model_overrides`` must build a network that fits: layers bounded, then parameters
        counted on the meta device (no memory taken), before anything is read or written."""
        import torch

        from cellp2p.models import build_model, count_parameters
        from cellp2p.runtime import memory_bytes

        given = json.dumps(self.model_overrides)[:80]
        for key in ("depth", "n_convs"):
            value = self.model_overrides.get(key)
            if isinstance(value, int) and value > MAX_LAYERS:
                raise CellP2PError(
                    f"model_overrides {given}: {key} {value} is more than cellp2p builds "
                    f"(at most {MAX_LAYERS}); use a smaller {key}"
                )
        kind = "unet" if self.mode == "unet" else "generator"
        up = {} if self.upsample is None else {"up": self.upsample}
        try:
            with torch.device("meta"):
                net = build_model(kind, self.preset, 1, 1, **{**up, **self.model_overrides})
        except (CellP2PError, TypeError, ValueError) as err:
            raise CellP2PError(f"model_overrides {given}: {err}") from None
        n = count_parameters(net)
        memory = memory_bytes()
        limit = min(MAX_PARAMETERS, memory // 16) if memory else MAX_PARAMETERS
        if n > limit:  # 16 bytes a parameter: weights, gradients and Adam's two moments
            raise CellP2PError(
                f"model_overrides {given}: the {kind} would have {n / 1e6:,.0f} M parameters, "
                f"more than fit here ({limit / 1e6:,.0f} M); use a smaller base or depth"
            )

    def _check_sources(self) -> None:
        """Training data from a manifest or from two files, not both and not half of either."""
        if self.ab or self.ab_val:  # AB folders: their own checks (cellp2p.ab)
            from cellp2p.ab import check_ab_options

            check_ab_options(self)
            return
        if self.manifest and (self.volume or self.labels):
            raise CellP2PError("give either --manifest or --volume/--labels, not both")
        if self.data_dir and not self.manifest:
            raise CellP2PError("--data-dir is where --manifest's files are: give --manifest too")
        if not self.manifest and not (self.volume or self.labels):
            raise CellP2PError(
                "no training data: give --volume V.tif --labels L.tif, or --manifest NAME "
                "(e.g. isbi2012), or try 'cellp2p synth --out DIR' for a synthetic pair"
            )
        if not self.manifest and not (self.volume and self.labels):
            given, missing = ("--volume", "--labels") if self.volume else ("--labels", "--volume")
            raise CellP2PError(f"{given} needs {missing} too: training reads a pair of stacks")

    def _check_combinations(self) -> None:
        """Options that are valid alone but contradict each other."""
        if self.direction == "BtoA" and self.task != "translate":
            raise CellP2PError(
                "--direction BtoA makes images from labels: use it with --task translate"
            )
        if self.mode == "pix2pix" and self.lambda_l1 == 0 and self.lambda_gan == 0:
            raise CellP2PError(
                "--lambda-l1 0 with --lambda-gan 0 leaves nothing to train; set one > 0"
            )
        if self.loss is not None and self.mode != "unet":
            raise CellP2PError(
                f"--loss {self.loss} is the U-Net's loss; pix2pix trains with --lambda-l1 and "
                "--lambda-gan: drop --loss or use --mode unet"
            )
        if self.loss is not None and self.loss not in TASK_LOSSES[self.task]:
            raise CellP2PError(
                f"--loss {self.loss} does not fit --task {self.task}; use one of "
                f"{', '.join(TASK_LOSSES[self.task])}"
            )
        if self.task == "translate" and self.labels_mode != "auto":
            raise CellP2PError(
                f"--labels-mode {self.labels_mode} turns labels into classes: it needs "
                "--task segment (translation learns the target as an image)"
            )
        if self.border_weights and self.mode != "unet":
            raise CellP2PError(
                "--border-weights weighs the U-Net's loss; pix2pix has no per-pixel weights: "
                "drop --border-weights or use --mode unet"
            )
        if self.instance_target == "boundary" and self.mode != "unet":
            raise CellP2PError(
                "--instance-target boundary makes classes, which pix2pix does not learn: use "
                "--instance-target separated or --mode unet"
            )
        if self.elastic and self.augmentation() == "none":
            raise CellP2PError(
                "--elastic is part of the augmentation, which is none here (--augment none, "
                "pix2pix's default): drop --augment none, or give --augment flips or full"
            )
        if self.best_metric is not None and not _is_metric(self.best_metric, self.task):
            raise CellP2PError(
                f"--best-metric {self.best_metric}: not a --task {self.task} metric; use one "
                f"of {', '.join(METRICS[self.task])}"
            )

    def learning_rate(self) -> float:
        """``lr``, or the mode's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def augmentation(self) -> str:
        """The training augmentation: ``augment``, or the mode's default."""
        return self.augment or DEFAULT_AUGMENT[self.mode]

    def instance_scheme(self) -> str:
        """What instance labels train: ``instance_target``, or the mode's default."""
        return self.instance_target or DEFAULT_INSTANCE_TARGET[self.mode]

    def loss_name(self) -> str:
        """The U-Net's supervised loss: ``loss``, or the task's default."""
        return self.loss or DEFAULT_LOSS[self.task]

    def best_metric_name(self) -> str:
        """The validation metric that chooses best.pt: ``best_metric``, or the task's default."""
        return self.best_metric or DEFAULT_BEST_METRIC[self.task]


def _is_metric(name: str, task: str) -> bool:
    """Whether validation of ``task`` reports ``name`` (per-class scores up to MAX_CLASSES)."""
    if name in METRICS[task]:
        return True
    if task != "segment":
        return False
    prefix, _, k = name.rpartition("_")
    return name in _METRIC_PARTS or (
        prefix in ("dice", "iou") and k.isdigit() and int(k) < MAX_CLASSES
    )


def _check_type(name: str, kind: str, value: Any, source: str) -> None:
    """Raise CellP2PError unless ``value`` is of the field type ``kind`` (e.g. ``int | None``)."""
    kinds = kind.replace(" ", "").split("|")
    if not any(_is_type(value, k) for k in kinds):
        raise CellP2PError(f"{source}: option {name} should be {kind}, got {value!r}")


def _is_type(value: Any, kind: str) -> bool:
    """``value`` is of the annotation ``kind``; bools are not ints, ints are floats."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    types = {"int": int, "float": (int, float), "str": str, "dict": dict, "None": type(None)}
    return isinstance(value, types.get(kind, object))


def flag(name: str) -> str:
    """The command-line flag of field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def option_fields() -> list[Any]:
    """The TrainConfig fields that are command-line options, in table order."""
    return [f for f in fields(TrainConfig) if f.metadata["cli"]]


def table_field(name: str) -> Any:
    """The row (dataclass field) of option ``name``."""
    return next(f for f in fields(TrainConfig) if f.name == name)


def field_type(f: Any) -> str:
    """The value type of a field, without ``| None``: ``int``, ``float``, ``str``, ``bool``."""
    return next(k for k in str(f.type).replace(" ", "").split("|") if k != "None")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of options in a ``--config`` file (its keys are checked by from_dict)."""
    try:
        loaded = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CellP2PError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CellP2PError(f"{path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(loaded, dict):
        raise CellP2PError(f'{path}: must hold a JSON object of options, e.g. {{"crop": 256}}')
    return loaded


def _same(key: str, a: Any, b: Any) -> bool:
    """Whether two values of option ``key`` mean the same (paths: the same file)."""
    if a == b:
        return True
    if key in ("volume", "labels", "data_dir", "ab", "ab_val") and a is not None and b is not None:
        pa, pb = Path(a), Path(b)
        if pa.resolve() == pb.resolve():
            return True
        try:
            return pa.samefile(pb)
        except OSError:
            return False
    return False


def resume_conflicts(saved: TrainConfig, overrides: Mapping[str, Any]) -> list[str]:
    """The options in ``overrides`` that contradict the run ``saved`` describes, in words."""
    return [
        f"{flag(k)} {overrides[k]!r} (the run has {getattr(saved, k)!r})"
        for k in RESUME_FIXED
        if k in overrides and not _same(k, getattr(saved, k), overrides[k])
    ]


def resumed_config(
    saved: Mapping[str, Any], overrides: Mapping[str, Any], path: str
) -> TrainConfig:
    """The config a resumed run continues with: the checkpoint's, changed by ``overrides``.

    The saved options are checked first (naming the checkpoint), then every override that would
    change the networks or their data (mode, task, preset, direction, data files, …) is refused
    in one line: the weights and the normalisation in the checkpoint belong to the saved ones.
    """
    cfg = TrainConfig.from_dict(saved, path)
    try:
        cfg.validate()
    except CellP2PError as err:
        raise CellP2PError(
            f"{path}: the run's recorded options are not valid here ({err}); the checkpoint "
            "is damaged or from another cellp2p version: start a new run with another --out"
        ) from None
    diffs = resume_conflicts(cfg, overrides)
    if diffs:
        raise CellP2PError(
            f"{path}: --resume continues the run as it was trained, but {'; '.join(diffs)}; "
            "drop those options, or train a new run with another --out"
        )
    return TrainConfig.from_dict({**asdict(cfg), **overrides}, "--resume")
