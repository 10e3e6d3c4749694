"""The ``cellp2p`` command line: click parses, then one library function does the work.

The options of ``train`` and ``ablate`` (and the ones other commands share with them) are
generated from the table in :mod:`cellp2p.config`; other choice lists come from their owners.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from cellp2p import __version__
from cellp2p.demo import DEFAULT_STEPS as DEMO_STEPS
from cellp2p.errors import CellP2PError, os_error_line

if TYPE_CHECKING:  # the table imports torch (through its choice lists): only when used
    from cellp2p.config import TrainConfig


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
            raise click.ClickException(os_error_line(err)) from None
        except MemoryError:
            raise click.ClickException(
                "out of memory: use smaller inputs or a smaller --batch-size, --crop or --tile"
            ) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellp2p")
def main() -> None:
    """U-Net and pix2pix for microscopy stacks: segment or translate TIFF stacks."""


# -- options from the table --------------------------------------------------------------------

Options = Callable[[], list[click.Parameter]]
_TABLE = object()  # "the table's value" for table_option's overrides


class TableCommand(click.Command):
    """A command whose options are built on first use, listed under the TrainConfig groups.

    The choice lists live in the modules that own them, and those import torch: building the
    options only when this command runs or shows its help keeps ``cellp2p --help``, ``info``
    and ``synth`` quick.
    """

    def __init__(self, *args: Any, options: Options, grouped: bool = False, **kwargs: Any) -> None:
        self._pending: Options | None = options
        self.grouped = grouped
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        """The generated options, then the ones declared on the function."""
        if self._pending is not None:
            make, self._pending = self._pending, None
            self._params = [*make(), *self._params]
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = list(value)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """With ``grouped``: one section per TrainConfig group (Data, Model, ...), then the rest."""
        if not self.grouped:
            return super().format_options(ctx, formatter)
        from cellp2p.config import GROUPS

        sections: dict[str, list[tuple[str, str]]] = {g: [] for g in (*GROUPS, "")}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections[getattr(param, "group", "")].append(record)
        for group, rows in sections.items():
            if rows:
                with formatter.section(f"{group.capitalize()} options" if group else "Options"):
                    formatter.write_dl(rows)


def table_option(name: str, *, default: Any = _TABLE, help: str | None = None) -> click.Option:
    """The click option of TrainConfig field ``name``: flag, type, default, choices and help from
    its row; ``default`` and ``help`` replace the row's where a command means something else."""
    from cellp2p.config import field_type, flag, table_field

    f = table_field(name)
    meta = f.metadata
    default = f.default if default is _TABLE else default
    kw: dict[str, Any] = {"default": default, "help": meta["help"] if help is None else help}
    kind = field_type(f)
    decl = flag(name)
    if kind == "bool":  # on by default or unset (None: the data decides): --x/--no-x
        decl = f"{decl}/--no-{decl[2:]}" if default or default is None else decl
        kw.update(is_flag=True, show_default=bool(default))
    else:
        kw["show_default"] = default is not None
        if meta["choices"]:
            kw["type"] = click.Choice([str(c) for c in meta["choices"]])
            if kind == "int":  # as text, then "70" -> 70: click.Choice of ints needs click >= 8.2
                kw["default"] = None if default is None else str(default)
                kw["callback"] = lambda _ctx, _param, v: None if v is None else int(v)
        else:
            kw["type"] = (
                click.Path() if meta["path"] else {"int": int, "float": float}.get(kind, str)
            )
    option = click.Option([decl], **kw)
    option.group = meta["group"]  # type: ignore[attr-defined] # read by TableCommand's help
    return option


# -- info, synth, fetch ------------------------------------------------------------------------


@main.command()
@click.argument("target")
@click.option(
    "--level", type=click.IntRange(min=0), default=0, help="Pyramid level of an OME-Zarr store."
)
def info(target: str, level: int) -> None:
    """Describe a stack (TIFF, PNG or folder) or a data manifest (e.g. isbi2012).

    Prints shape, axes, dtype, value range, label values and pixel size.
    """
    from cellp2p.info import info as info_fn

    click.echo(info_fn(target, level=level))


def _synth_options() -> list[click.Parameter]:
    """--kind from cellp2p.synth.KINDS (which imports scipy, so on first use)."""
    from cellp2p.synth import KINDS

    kind_help = (
        "EM membranes (binary labels, ISBI convention) or fluorescent nuclei "
        "(16-bit, instance labels)."
    )
    return [
        click.Option(
            ["--kind"],
            type=click.Choice(KINDS),
            default=KINDS[0],
            show_default=True,
            help=kind_help,
        ),
        click.Option(
            ["--seed"], type=int, default=0, show_default=True, help="Seed of the synthetic data."
        ),
    ]


@main.command(cls=TableCommand, options=_synth_options)
@click.option("--slices", type=int, default=8, show_default=True, help="Number of slices (Z).")
@click.option("--size", default="256", show_default=True, help="Slice size: N or HxW.")
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


def _train_options() -> list[click.Parameter]:
    """Every command-line field of TrainConfig, in table order."""
    from cellp2p.config import option_fields

    return [table_option(f.name) for f in option_fields()]


def _train_config(ctx: click.Context, params: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Defaults < --config file < flags given on the command line; and those flags."""
    from cellp2p.config import TrainConfig, option_fields, read_config_file

    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    explicit = {
        f.name: params[f.name] for f in option_fields() if ctx.get_parameter_source(f.name) in given
    }
    path = params["config_file"]
    values = {**(read_config_file(path) if path else {}), **explicit}
    return TrainConfig.from_dict(values, str(path or "options")), explicit


@main.command(cls=TableCommand, options=_train_options, grouped=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--force",
    is_flag=True,
    help="Write the run into an existing folder that holds other files (none is changed).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="JSON file of these options (flags override it).",
)
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
    overrides = explicit
    if params["resume"] and params["config_file"]:  # the file's options count on resume too
        from cellp2p.config import read_config_file

        overrides = {**read_config_file(params["config_file"]), **explicit}
    record = train_fn(
        cfg,
        params["out"],
        resume=params["resume"],
        force=params["force"],
        resume_overrides=overrides,
    )
    shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float) and k != "time"}
    if is_main():  # under torchrun every process returns the record; say it once
        click.echo(f"done: {params['out']} step {record.get('step')} {json.dumps(shown)}")


# -- evaluate, compare, ablate -----------------------------------------------------------------

_DATA_FIELDS = ("volume", "labels", "manifest", "data_dir")


def _evaluate_options() -> list[click.Parameter]:
    """--task from the table, --kind from the segmentation outputs of cellp2p.outputs."""
    from cellp2p.outputs import OUTPUTS

    kinds = [o for o in OUTPUTS if o != "image"]  # what `predict --output` writes for segment
    return [
        table_option("task", help="Segmentation or image metrics."),
        table_option(
            "direction", help="With --ab: the run's direction (AtoB scores against the B halves)."
        ),
        click.Option(
            ["--kind"],
            type=click.Choice(kinds),
            default="auto",
            show_default=True,
            help="What a segmentation prediction holds (auto: guessed from its values).",
        ),
    ]


@main.command(cls=TableCommand, options=_evaluate_options)
@click.argument("pred", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    help="Ground truth: labels (segment) or target images (translate).",
)
@click.option(
    "--ab",
    type=click.Path(path_type=Path),
    help="Instead of --labels: the pix2pix AB images PRED (a folder of PNGs) was predicted from.",
)
@click.option("--slices", help="Label slices to score, e.g. 25-29 (default: all).")
@click.option("--data-range", type=float, help="Translate: intensity range [target dtype range].")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the metrics as JSON."
)
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
def evaluate(pred: Path, labels: Path | None, json_path: Path | None, **params: Any) -> None:
    """Score a prediction stack PRED against --labels (or --ab): a per-slice table and the mean.

    \b
    segment:   pixel error, Dice/IoU per class, ISBI 2012 V_rand/V_info (best over
               thresholds of a probability map, with split/merge parts), AP@0.5/0.75
    translate: MAE, PSNR, SSIM
    """
    from cellp2p.evaluate import evaluate as evaluate_fn

    evaluate_fn(pred, labels, json_path=json_path, echo=click.echo, **params)
    if json_path:
        click.echo(f"wrote {json_path}")


def _compare_options() -> list[click.Parameter]:
    """The data options and --device of the table; --checkpoint from cellp2p.compare."""
    from cellp2p.compare import CHECKPOINTS

    ab = table_option("ab", help="Folder of pix2pix AB images to score on (not the stacks).")
    checkpoint = click.Option(
        ["--checkpoint"],
        type=click.Choice(CHECKPOINTS),
        default=CHECKPOINTS[0],
        show_default=True,
        help="Which weights to score (best.pt was chosen on the validation slices).",
    )
    return [*(table_option(name) for name in (*_DATA_FIELDS, "device")), ab, checkpoint]


@main.command(cls=TableCommand, options=_compare_options)
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--slices", help="Held-out slices [manifest val split, else the runs' val slices].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option(
    "--segmenter",
    type=click.Path(path_type=Path),
    help="Segmentation run on real images: scores how segmentable BtoA runs' images are.",
)
@click.option("--names", help="Comma-separated row names, one per run [folder names].")
@click.option(
    "--force",
    is_flag=True,
    help="Write the report into an existing folder that holds other files (none is changed).",
)
def compare(runs: tuple[Path, ...], names: str | None, **params: Any) -> None:
    """Compare trained RUNS on the same held-out slices; writes report.md/.json/.html to --out.

    One table row per run (objective, size, steps, speed, every evaluate metric), PNG panels
    per slice (input | target | runs | error maps) and the loss curves overlaid.
    """
    from cellp2p.compare import compare as compare_fn

    compare_fn(list(runs), names=names.split(",") if names else None, echo=click.echo, **params)


def _ablate_options() -> list[click.Parameter]:
    """The TrainConfig options ablate shares with train, with ablate's own defaults."""
    from cellp2p.ablate import OPTIONS

    return [table_option(name, **own) for name, own in OPTIONS.items()]


@main.command(cls=TableCommand, options=_ablate_options, grouped=True)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Folder: runs/ and report."
)
@click.option("--variants", help="Comma-separated subset of unet,l1,gan,cgan,l1_gan,l1_cgan [all].")
@click.option(
    "--segmenter",
    type=click.Path(path_type=Path),
    help="Segmentation run on real images: segmentability of BtoA images.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into an existing folder that holds other files (none is changed).",
)
def ablate(
    out: Path, variants: str | None, segmenter: Path | None, force: bool, **base: Any
) -> None:
    """The pix2pix loss ablation: U-Net, L1, GAN, cGAN, L1+GAN, L1+cGAN on one data set.

    \b
    Trains each variant with the same steps, batch, crop and seed into OUT/runs/<variant>,
    then writes the comparison (report.md/.json/.html) into OUT. Run the same command again
    to continue an interrupted ablation: finished variants are skipped, a partial one resumes.
    """
    from cellp2p.ablate import ablate as ablate_fn

    chosen = variants.split(",") if variants else None
    ablate_fn(base, out=out, variants=chosen, segmenter=segmenter, force=force, echo=click.echo)


# -- predict -----------------------------------------------------------------------------------


def _predict_options() -> list[click.Parameter]:
    """--output and --threshold from cellp2p.outputs, --tile from cellp2p.tiling, --device."""
    from cellp2p.outputs import OUTPUTS, THRESHOLD
    from cellp2p.tiling import DEFAULT_TILE, WHOLE_SLICE_MAX

    output_help = (
        "auto: prob for segmentation, image for translation. mask: uint8 0/255 (class values "
        "for multiclass); labels: instance labels (the watershed tuned at training)."
    )
    tile_help = (
        f"Tile size in pixels [default: whole slice up to {WHOLE_SLICE_MAX} px, else "
        f"{DEFAULT_TILE} or the crop]."
    )
    return [
        click.Option(
            ["--output"],
            type=click.Choice(OUTPUTS),
            default="auto",
            show_default=True,
            help=output_help,
        ),
        click.Option(
            ["--threshold"],
            type=float,
            default=None,
            help=f"Foreground probability: masks [{THRESHOLD}]; labels [the one tuned on the "
            f"validation slices at the end of training, else {THRESHOLD}].",
        ),
        click.Option(["--tile"], type=int, help=tile_help),
        table_option("device"),
        table_option("precision"),
    ]


@main.command(cls=TableCommand, options=_predict_options)
@click.argument("stacks", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "-m",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder (uses checkpoints/best.pt, else last.pt), a .pt checkpoint, or an export: "
    "bioimage.io .zip or folder, TorchScript .pt, .onnx.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Output .tif or .zarr for one input, or a folder [default: NAME_pred.tif (a store: "
    "NAME_pred.zarr) next to each input].",
)
@click.option(
    "--overlap", type=float, default=0.25, show_default=True, help="Tile overlap fraction."
)
@click.option(
    "--tta/--no-tta",
    default=None,
    help="Average the 8 flips/90° rotations (8x slower) [default: only for --output labels, "
    "where training's tuning found it better].",
)
@click.option(
    "--batch-size", type=int, default=4, show_default=True, help="Tiles or slices per forward."
)
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--test-time-dropout",
    is_flag=True,
    help="Keep Dropout layers active (pix2pix-style noise); batch norm stays in eval mode.",
)
@click.option("--slices", help="Predict only these slices, e.g. 25-29 or 0,2,4-9.")
@click.option(
    "--resume", is_flag=True, help="Finish an interrupted .zarr output (only missing chunks)."
)
@click.option(
    "--level", type=click.IntRange(min=0), default=0, help="Pyramid level of an OME-Zarr input."
)
@click.option(
    "--ab",
    is_flag=True,
    help="STACKS are pix2pix AB images (folders or files): the input half in, the generated "
    "half out as 8-bit PNG of the same name into -o [NAME_pred/].",
)
def predict(stacks: tuple[Path, ...], model: Path, **params: Any) -> None:
    """Apply a trained run to STACK... (TIFF stacks, 2D images, folders, OME-Zarr/zarr/HDF5).

    \b
    Any slice size: tiled sliding-window inference with Gaussian blending. Stacks are read
    and written slice by slice; each output appears only when complete.
    """
    from cellp2p.predict import predict_stack

    if params.pop("ab"):  # issue 18: pix2pix AB images to PNGs
        from cellp2p.ab import predict_ab as predict_stack  # type: ignore[assignment]
    for path in predict_stack(stacks, model, **params):
        click.echo(f"wrote {path}")


# -- export ------------------------------------------------------------------------------------


def _export_options() -> list[click.Parameter]:
    """--format from cellp2p.export (which imports torch: built on first use)."""
    from cellp2p.export import FORMATS

    return [
        click.Option(
            ["--format", "fmt"],
            required=True,
            type=click.Choice(FORMATS),
            help="bioimageio: a bioimage.io model package (.zip, raw intensities in); "
            "torchscript (.pt) or onnx (.onnx): one file taking the normalised input.",
        )
    ]


@main.command(cls=TableCommand, options=_export_options)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output file (.zip, .pt or .onnx), or a folder for RUN_FORMAT.zip|pt|onnx.",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Checkpoint of a run folder (best falls back to last.pt when there is none).",
)
@click.option(
    "--authors",
    multiple=True,
    help="An author of a bioimage.io package, 'Name' or 'Name <email>'; repeat for several "
    "[default: cellp2p user].",
)
@click.option(
    "--license",
    "license_",
    default="MIT",
    show_default=True,
    help="SPDX licence id of a bioimage.io package.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def export(
    run: Path,
    fmt: str,
    out: Path,
    checkpoint: str,
    authors: tuple[str, ...],
    license_: str,
    force: bool,
) -> None:
    """Export RUN (a run folder or a .pt checkpoint) for use outside cellp2p.

    \b
    bioimage.io packages run in Fiji (deepImageJ), ilastik and bioimageio.core; TorchScript
    and ONNX files take the normalised input and give outputs in [0, 1]. The export is run on
    a validation crop and checked against the checkpoint (1e-4) before anything is written.
    """
    import time

    from cellp2p.export import export_model

    start = time.perf_counter()
    path = export_model(
        run,
        fmt,
        out,
        checkpoint=checkpoint,
        authors=list(authors) or None,
        license=license_,
        force=force,
    )
    size = path.stat().st_size / 1e6
    click.echo(f"wrote {path} ({size:.1f} MB, {time.perf_counter() - start:.0f} s)")


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
@click.option(
    "--steps", type=int, default=DEMO_STEPS, show_default=True, help="Training steps per model."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an earlier demo's results, or write into a folder holding other files "
    "(nothing of yours is deleted or changed).",
)
def demo(out: Path, manifest: str | None, steps: int, force: bool) -> None:
    """Run the whole tool end to end on synthetic data (or a manifest) and say where results are."""
    from cellp2p.demo import run_demo

    where = run_demo(out, manifest=manifest, steps=steps, force=force, echo=click.echo)
    click.echo(f"\nDemo results are in {where.resolve()}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
