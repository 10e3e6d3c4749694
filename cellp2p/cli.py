"""The ``cellp2p`` command line: click parses, then one library function does the work."""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from cellp2p import __version__
from cellp2p.errors import CellP2PError


class Group(click.Group):
    """Turns a CellP2PError into one ``Error: ...`` line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CellP2PError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except OSError as err:  # a file system refusal the library did not foresee: one line
            raise click.ClickException(_os_error_line(err)) from None


_OS_ERROR_HINTS = {
    errno.ENOSPC: "disk full; free space or choose another folder",
    errno.EDQUOT: "disk quota exceeded; free space or choose another folder",
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "permission denied; check its permissions or choose another path",
    errno.EROFS: "read-only file system; choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder; give a file",
    errno.ENOENT: "no such file or folder; check the path",
}


def _os_error_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else "output"
    what = _OS_ERROR_HINTS.get(err.errno) or f"{err.strerror or err}; check the path"
    return f"{where}: {what}"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellp2p")
def main() -> None:
    """U-Net and pix2pix for microscopy stacks: segment or translate TIFF stacks."""


# -- info, synth, fetch ------------------------------------------------------------------------


@main.command()
@click.argument("target")
def info(target: str) -> None:
    """Describe a stack (TIFF, PNG or folder) or a data manifest (e.g. isbi2012).

    Prints shape, axes, dtype, value range, label values and pixel size.
    """
    from cellp2p.info import info as info_fn

    click.echo(info_fn(target))


@main.command()
@click.option(
    "--kind",
    type=click.Choice(["em", "nuclei"]),
    default="em",
    show_default=True,
    help="EM membranes (binary labels, ISBI convention) or fluorescent nuclei "
    "(16-bit, instance labels).",
)
@click.option("--slices", type=int, default=8, show_default=True, help="Number of slices (Z).")
@click.option("--size", default="256", show_default=True, help="Slice size: N or HxW.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for volume.tif and labels.tif.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def synth(kind: str, slices: int, size: str, seed: int, out: Path, force: bool) -> None:
    """Write a seeded synthetic paired stack: OUT/volume.tif and OUT/labels.tif."""
    from cellp2p.synth import parse_size
    from cellp2p.synth import synth as synth_fn

    vol, lab = synth_fn(kind, out, slices, parse_size(size), seed=seed, force=force)
    click.echo(f"wrote {vol} and {lab}")


@main.command()
@click.argument("name")
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to download into (files land in DEST/NAME/).",
)
@click.option("--force", is_flag=True, help="Download again even if verified files exist.")
def fetch(name: str, dest: Path, force: bool) -> None:
    """Download a data set named by a manifest (e.g. isbi2012) and verify its checksums."""
    from cellp2p.manifests import fetch as fetch_fn

    paths = fetch_fn(name, dest, force=force)
    for role, path in paths.items():
        click.echo(f"{role}: {path}")


# -- train -------------------------------------------------------------------------------------

TRAIN_OPTIONS = [
    click.option(
        "--mode",
        type=click.Choice(["unet", "pix2pix"]),
        default="unet",
        show_default=True,
        help="U-Net baseline (supervised loss) or pix2pix cGAN (adversarial + λ·L1).",
    ),
    click.option(
        "--volume", type=click.Path(path_type=Path), help="Input stack (TIFF/PNG/folder)."
    ),
    click.option(
        "--labels",
        type=click.Path(path_type=Path),
        help="Target stack: labels (segment) or the second modality (translate).",
    ),
    click.option("--manifest", help="Data manifest name or JSON path (uses its split)."),
    click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        help="Where the manifest's files are (default: $CELLP2P_DATA).",
    ),
    click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder."),
    click.option(
        "--preset",
        type=click.Choice(["small", "course", "paper"]),
        default="small",
        show_default=True,
        help="Network size.",
    ),
    click.option(
        "--task",
        type=click.Choice(["segment", "translate"]),
        default="segment",
        show_default=True,
        help="Labels as classes, or the target as an image.",
    ),
    click.option(
        "--direction",
        type=click.Choice(["AtoB", "BtoA"]),
        default="AtoB",
        show_default=True,
        help="BtoA learns volume from labels (synthetic images).",
    ),
    click.option(
        "--labels-mode",
        type=click.Choice(["auto", "binary", "nonzero", "multiclass"]),
        default="auto",
        show_default=True,
        help="How labels become classes: nonzero = foreground is label > 0.",
    ),
    click.option("--train-slices", help="Training slices, e.g. 0-24 or 0,2,4-9."),
    click.option("--val-slices", help="Validation slices, e.g. 25-29."),
    click.option("--max-steps", type=int, help="Number of optimizer steps."),
    click.option("--epochs", type=int, help="Epochs (an epoch covers the training slices once)."),
    click.option(
        "--batch-size",
        type=int,
        default=4,
        show_default=True,
        help="Crops per step and process (under torchrun a step trains on W × this).",
    ),
    click.option("--crop", type=int, default=256, show_default=True, help="Training crop size."),
    click.option("--lr", type=float, help="Learning rate [unet 1e-3, pix2pix 2e-4]."),
    click.option(
        "--lr-decay-start",
        type=float,
        default=0.5,
        show_default=True,
        help="Fraction of the run after which the lr decays linearly to 0.",
    ),
    click.option(
        "--loss",
        type=click.Choice(["bce", "dice", "bcedice", "l1", "l2"]),
        help="U-Net loss [segment: bcedice, translate: l1].",
    ),
    click.option(
        "--lambda-l1",
        type=float,
        default=100.0,
        show_default=True,
        help="pix2pix L1 weight (0: GAN only).",
    ),
    click.option(
        "--lambda-gan",
        type=float,
        default=1.0,
        show_default=True,
        help="pix2pix adversarial weight (0: L1 only).",
    ),
    click.option(
        "--gan-mode",
        type=click.Choice(["vanilla", "lsgan", "hinge", "wgangp"]),
        default="vanilla",
        show_default=True,
        help="Adversarial objective.",
    ),
    click.option("--unconditional", is_flag=True, help="D sees the output only (GAN, not cGAN)."),
    click.option(
        "--receptive-field",
        type=click.Choice(["1", "16", "70", "286"]),
        default="70",
        show_default=True,
        help="PatchGAN receptive field in pixels.",
    ),
    click.option(
        "--upsample",
        type=click.Choice(["transpose", "resize"]),
        help="Decoder upsampling: transposed conv, or resize + conv (no checkerboard "
        "artefacts) [the preset's: transpose, course U-Net resize].",
    ),
    click.option(
        "--eval-every",
        type=int,
        default=100,
        show_default=True,
        help="Validate and checkpoint every N steps.",
    ),
    click.option("--best-metric", help="Validation metric for best.pt [dice_1 or psnr]."),
    click.option(
        "--augment/--no-augment",
        default=True,
        show_default=True,
        help="Flips, 90° rotations, intensity jitter.",
    ),
    click.option("--elastic", is_flag=True, help="Elastic deformation (U-Net paper)."),
    click.option("--jitter", is_flag=True, help="pix2pix resize-286/crop-256 jitter."),
    click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps."),
    click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16"]),
        default="auto",
        show_default=True,
        help="auto: bf16 on CUDA, fp32 on CPU.",
    ),
    click.option("--deterministic", is_flag=True, help="Deterministic kernels where possible."),
    click.option(
        "--sync-bn",
        is_flag=True,
        help="Under torchrun on GPUs: BatchNorm statistics over all processes' crops.",
    ),
    click.option(
        "--num-workers",
        type=int,
        default=0,
        show_default=True,
        help="Data-loading worker processes.",
    ),
    click.option(
        "--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."
    ),
    click.option("--quiet", is_flag=True, help="Plain log lines instead of progress bars."),
    click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path),
        help="JSON file of these options (flags override it).",
    ),
]


def _apply(options: list) -> Any:
    def decorate(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def _train_config(ctx: click.Context, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Defaults < --config file < flags given on the command line."""
    from cellp2p.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    config_file = params.get("config_file")
    if config_file:
        try:
            loaded = json.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise CellP2PError(f"{config_file}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CellP2PError(f"{config_file}: not valid JSON ({err}); fix the file") from None
        if not isinstance(loaded, dict):
            raise CellP2PError(
                f'{config_file}: must hold a JSON object of options, e.g. {{"crop": 256}}'
            )
        values.update(loaded)
    explicit = {}
    for key, value in params.items():
        if key not in names:
            continue
        if key == "receptive_field":
            value = int(value)
        if isinstance(value, Path):
            value = str(value)
        if ctx.get_parameter_source(key) in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            explicit[key] = value
        values.setdefault(key, value)
    values.update(explicit)
    return TrainConfig.from_dict(values, str(config_file or "options")), explicit


@main.command()
@_apply(TRAIN_OPTIONS)
@click.pass_context
def train(ctx: click.Context, **params: Any) -> None:
    """Train a U-Net baseline or a pix2pix cGAN; writes a run folder to --out.

    \b
    The run folder holds config.json, metrics.jsonl (one record per evaluation),
    checkpoints/last.pt and best.pt, samples/*.png and loss_curve.png.
    """
    from cellp2p.distributed import is_main
    from cellp2p.train import train as train_fn

    cfg, explicit = _train_config(ctx, params)
    record = train_fn(cfg, params["out"], resume=params["resume"], resume_overrides=explicit)
    shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float) and k != "time"}
    if is_main():  # under torchrun every process returns the record; say it once
        click.echo(f"done: {params['out']} step {record.get('step')} {json.dumps(shown)}")


# -- evaluate, compare, ablate -----------------------------------------------------------------

_DATA_OPTIONS = [
    click.option("--volume", type=click.Path(path_type=Path), help="Input stack (TIFF/folder)."),
    click.option(
        "--labels", type=click.Path(path_type=Path), help="Labels (or target images) stack."
    ),
    click.option("--manifest", help="Data manifest name or JSON path (uses its val split)."),
    click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        help="Where the manifest's files are (default: $CELLP2P_DATA).",
    ),
]


@main.command()
@click.argument("pred", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    required=True,
    help="Ground truth: labels (segment) or target images (translate).",
)
@click.option("--slices", help="Label slices to score, e.g. 25-29 (default: all).")
@click.option(
    "--task",
    type=click.Choice(["segment", "translate"]),
    default="segment",
    show_default=True,
    help="Segmentation or image metrics.",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "prob", "mask", "labels"]),
    default="auto",
    show_default=True,
    help="What a segmentation prediction holds (auto: guessed from its values).",
)
@click.option("--data-range", type=float, help="Translate: intensity range [target dtype range].")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the metrics as JSON."
)
def evaluate(
    pred: Path,
    labels: Path,
    slices: str | None,
    task: str,
    kind: str,
    data_range: float | None,
    json_path: Path | None,
) -> None:
    """Score a prediction stack PRED against --labels: a per-slice table and the mean.

    \b
    segment:   pixel error, Dice/IoU per class, ISBI 2012 V_rand/V_info (best over
               thresholds of a probability map, with split/merge parts), AP@0.5/0.75
    translate: MAE, PSNR, SSIM
    """
    from cellp2p.evaluate import evaluate as evaluate_fn

    evaluate_fn(
        pred,
        labels,
        slices=slices,
        task=task,
        json_path=json_path,
        kind=kind,
        data_range=data_range,
        echo=click.echo,
    )
    if json_path:
        click.echo(f"wrote {json_path}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_apply(_DATA_OPTIONS)
@click.option("--slices", help="Held-out slices [manifest val split, else the runs' val slices].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option(
    "--segmenter",
    type=click.Path(path_type=Path),
    help="Segmentation run on real images: scores how segmentable BtoA runs' images are.",
)
@click.option("--names", help="Comma-separated row names, one per run [folder names].")
@click.option(
    "--checkpoint",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Which weights to score (best.pt was chosen on the validation slices).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
def compare(runs: tuple[Path, ...], names: str | None, **params: Any) -> None:
    """Compare trained RUNS on the same held-out slices; writes report.md/.json/.html to --out.

    One table row per run (objective, size, steps, speed, every evaluate metric), PNG panels
    per slice (input | target | runs | error maps) and the loss curves overlaid.
    """
    from cellp2p.compare import compare as compare_fn

    compare_fn(list(runs), names=names.split(",") if names else None, echo=click.echo, **params)


@main.command()
@_apply(_DATA_OPTIONS)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Folder: runs/ and report."
)
@click.option("--max-steps", type=int, default=1000, show_default=True, help="Steps per run.")
@click.option(
    "--preset",
    type=click.Choice(["small", "course", "paper"]),
    default="small",
    show_default=True,
    help="Network size.",
)
@click.option("--crop", type=int, default=256, show_default=True, help="Training crop size.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Crops per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--eval-every", type=int, help="Validate every N steps [max-steps / 10].")
@click.option(
    "--direction",
    type=click.Choice(["AtoB", "BtoA"]),
    default="AtoB",
    show_default=True,
    help="BtoA makes images from labels.",
)
@click.option(
    "--task",
    type=click.Choice(["segment", "translate"]),
    help="[segment; translate for BtoA]",
)
@click.option(
    "--gan-mode",
    type=click.Choice(["vanilla", "lsgan", "hinge", "wgangp"]),
    default="vanilla",
    show_default=True,
    help="Adversarial objective of the GAN variants.",
)
@click.option(
    "--upsample",
    type=click.Choice(["transpose", "resize"]),
    help="Decoder upsampling of every variant [the preset's].",
)
@click.option("--variants", help="Comma-separated subset of unet,l1,gan,cgan,l1_gan,l1_cgan [all].")
@click.option(
    "--segmenter",
    type=click.Path(path_type=Path),
    help="Segmentation run on real images: segmentability of BtoA images.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--quiet", is_flag=True, help="Plain log lines instead of progress bars.")
def ablate(variants: str | None, **params: Any) -> None:
    """The pix2pix loss ablation: U-Net, L1, GAN, cGAN, L1+GAN, L1+cGAN on one data set.

    \b
    Trains each variant with the same steps, batch, crop and seed into OUT/runs/<variant>,
    then writes the comparison (report.md/.json/.html) into OUT. Run the same command again
    to continue an interrupted ablation: finished variants are skipped, a partial one resumes.
    """
    from cellp2p.ablate import ablate as ablate_fn

    ablate_fn(variants=variants.split(",") if variants else None, echo=click.echo, **params)


# -- predict -----------------------------------------------------------------------------------


@main.command()
@click.argument("stacks", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "-m",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder (uses checkpoints/best.pt, else last.pt) or a .pt checkpoint.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Output .tif for one input, or a folder [default: NAME_pred.tif next to each input].",
)
@click.option(
    "--output",
    type=click.Choice(["auto", "prob", "mask", "labels", "image"]),
    default="auto",
    show_default=True,
    help="auto: prob for segmentation, image for translation. mask: uint8 0/255 (class "
    "values for multiclass); labels: instance labels (connected components).",
)
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="Foreground probability for mask and labels.",
)
@click.option(
    "--tile",
    type=int,
    help="Tile size in pixels [default: whole slice up to 1024 px, else 512 or the crop].",
)
@click.option(
    "--overlap", type=float, default=0.25, show_default=True, help="Tile overlap fraction."
)
@click.option("--tta", is_flag=True, help="Average the 8 flips/90° rotations (8x slower).")
@click.option(
    "--batch-size", type=int, default=4, show_default=True, help="Tiles or slices per forward."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--test-time-dropout",
    is_flag=True,
    help="Keep Dropout layers active (pix2pix-style noise); batch norm stays in eval mode.",
)
@click.option("--slices", help="Predict only these slices, e.g. 25-29 or 0,2,4-9.")
def predict(
    stacks: tuple[Path, ...],
    model: Path,
    out: Path | None,
    output: str,
    threshold: float,
    tile: int | None,
    overlap: float,
    tta: bool,
    batch_size: int,
    device: str,
    force: bool,
    quiet: bool,
    test_time_dropout: bool,
    slices: str | None,
) -> None:
    """Apply a trained run to STACK... (TIFF stacks, 2D images or folders of images).

    \b
    Any slice size: tiled sliding-window inference with Gaussian blending. Stacks are read
    and written slice by slice; each output appears only when complete.
    """
    from cellp2p.predict import predict_stack

    paths = predict_stack(
        stacks,
        model,
        out=out,
        output=output,
        threshold=threshold,
        tile=tile,
        overlap=overlap,
        tta=tta,
        batch_size=batch_size,
        device=device,
        force=force,
        quiet=quiet,
        test_time_dropout=test_time_dropout,
        slices=slices,
    )
    for path in paths:
        click.echo(f"wrote {path}")


# -- demo --------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo_out"),
    show_default=True,
    help="Folder for everything the demo writes.",
)
@click.option(
    "--manifest", help="Run on a real data set (e.g. isbi2012) instead of synthetic data."
)
@click.option("--steps", type=int, default=60, show_default=True, help="Training steps per model.")
@click.option("--force", is_flag=True, help="Replace an earlier demo folder.")
def demo(out: Path, manifest: str | None, steps: int, force: bool) -> None:
    """Run the whole tool end to end on synthetic data (or a manifest) and say where results are."""
    from cellp2p.demo import run_demo

    where = run_demo(out, manifest=manifest, steps=steps, force=force, echo=click.echo)
    click.echo(f"\nDemo results are in {where.resolve()}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
