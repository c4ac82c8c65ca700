"""The ``lurker`` command.

Errors lurker explains (bad model spec, wrong input shape, ...) are printed as one
paragraph without a traceback; set ``LURKER_DEBUG=1`` to see the traceback as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from .errors import LurkerError, OpKeyError


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LurkerErrors into a clean message and exit status 2, and Ctrl-C into exit
    status 130 (SIGINT's) with one line: click would print "Aborted!" and exit 1, which
    reads as a failure, for `lurker serve` even on its documented way to stop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LurkerError as e:
            if os.environ.get("LURKER_DEBUG"):
                raise
            if not (e.every_rank and os.environ.get("RANK", "0") != "0"):  # once per job
                click.secho(f"error: {e.for_cli()}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if os.environ.get("LURKER_DEBUG"):
                raise
            what = "stopped" if fn.__name__ == "serve" else "interrupted"
            click.echo(f"lurker {fn.__name__}: {what}", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lurker")
def main() -> None:
    """lurker: a microscope for PyTorch models."""
    # a warning reads as one line: the place in lurker's or click's code it would name
    # tells a command-line user nothing
    warnings.formatwarning = _one_line_warning


def _out_folder(path: str, hint: str) -> str:
    """Make the folder that file ``path`` goes in, or refuse it now: before the work that
    makes the file, not after it. Returns the path, ``~`` expanded."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise click.BadParameter(f"{path!r} is a folder: give a file name", param_hint=hint)
    if target.is_file():  # written over: the file must be writable, whatever its folder
        if not os.access(target, os.W_OK):
            raise click.BadParameter(f"cannot write {path!r}: it is read-only", param_hint=hint)
        _can_create_in(target.parent, path, hint)  # (written through a file beside it)
        return str(target)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(
            f"cannot write {path!r}: cannot create its folder {str(folder)!r} ({e.strerror or e})",
            param_hint=hint,
        ) from None
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(
            f"cannot write {path!r}: its folder {str(folder)!r} is not writable", param_hint=hint
        )
    _can_create_in(folder, path, hint)
    return str(target)


def _can_create_in(folder: Path, path: str, hint: str) -> None:
    """Create and remove a file in ``folder``: ``os.access`` says yes for folders where no
    file can be made (``/proc``, a read-only mount), and the file is written through a
    temporary file beside it, after all the work that makes it."""
    from .store.files import TMP_PREFIX

    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}check.")
    except OSError as e:
        raise click.BadParameter(
            f"cannot write {path!r}: no file can be created in its folder {str(folder)!r} "
            f"({e.strerror or e}); give a path in a folder you can write to",
            param_hint=hint,
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _channel_dim_option(then: str) -> Callable[[Any], Any]:
    """``--channel-dim`` of the commands that feed images (probe, explain), checked by
    :func:`_channel_axis`; ``then``: what the command does with it, and its default."""
    return click.option(
        "--channel-dim",
        type=int,
        default=None,
        callback=lambda ctx, param, value: _channel_axis(value),
        metavar="AXIS",
        help="The axis of the model's input that holds the channels (counting the batch "
        "axis): -1 for a model that takes (N, H, W, C) images. " + then,
    )


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``, resolved by :func:`lurker.models.default_device` when not given, and
    checked before the model is built: a name torch does not know, or a GPU this machine
    lacks, is one line naming the fix, not a traceback after minutes of loading. ``serve``
    leaves it None (its model, and torch, load at the first page that needs them; the
    session applies the same rule)."""
    if value is None:
        if ctx.command.name == "serve":
            return None
        from .models import default_device

        return default_device()
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(
            f"{value!r} is not a device: give cpu, cuda or cuda:N", param_hint="'--device'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            f"{value!r}: no CUDA GPU is available here; use --device cpu (or leave --device "
            "out: cuda when available, else cpu)",
            param_hint="'--device'",
        )
    return value


#: ``--device`` of every command that runs a model: one default, one check
device_option = click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    callback=_device,
    help="Where the model runs: cpu, cuda, cuda:1 (default: cuda if available, else cpu).",
)


#: ``--normalize`` of probe, explain and featviz: one rule (probe.data.default_normalize)
NORMALIZE_CHOICES = (
    "imagenet (ImageNet's mean and std), none (images in [0, 1]), raw (uint8 images, 0..255, "
    "for a model whose forward scales them itself, e.g. x.float() / 255), or MEAN/STD with one "
    "value per channel, e.g. 0.5,0.5,0.5/0.25,0.25,0.25 (0.5/0.25 for 1 channel). Default: "
    "imagenet for a 3-channel model, none for others."
)


def _one_line_warning(
    message: Any, category: Any, filename: str, lineno: int, line: Any = None
) -> str:
    return f"warning: {message}\n"


def _stats_table(tr: Any) -> str:
    """``lurker trace --stats``: one row per op of ``Trace.stats()``, in execution order."""
    rows = [("op", "module", "shape", "mean", "std", "min", "max", "zeros")]
    for label, st in tr.stats().items():
        op = tr[label]
        shape = "x".join(map(str, op.shape)) if op.shape is not None else "--"
        nums = [st.mean, st.std, st.min, st.max]
        cells = [f"{v:.4g}" if v is not None else "--" for v in nums]
        note = f" ({st.nonfinite:,} NaN/inf)" if st.nonfinite else ""
        rows.append((label, op.module or "", shape, *cells, f"{st.zeros:.1%}{note}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(["stats: each op's output (mean, std, min, max of its finite values)", *lines])


@main.command(
    epilog="""\b
Examples:
  lurker trace torchvision:resnet18 -i 1,3,224,224 --depth 2
  lurker trace lurker.examples:TinyGPT -i 1,32 --input-dtype long:0-50257
  lurker trace torchvision:fasterrcnn_mobilenet_v3_large_fpn -i "[3,128,128]"
"""
)
@click.argument("model")
@click.option(
    "--input-shape",
    "-i",
    required=True,
    help="Input shape(s), e.g. 1,3,224,224; several inputs separated by ';'; a list of "
    "tensors in brackets, e.g. '[3,128,128]' (detection models take a list of images).",
)
@click.option(
    "--input-dtype",
    default=None,
    help="dtype of the inputs, with an optional value range LOW-HIGH (HIGH excluded), e.g. "
    "long:0-50257 for token ids; one for all inputs or one per input separated by ';'. "
    "Default: float (standard normal).",
)
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="State dict to load.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    default="graph.svg",
    show_default=True,
    help="Graph file: .svg, .pdf, .png or .dot.",
)
@click.option(
    "--depth", type=click.IntRange(min=0), default=None, help="Collapse modules deeper than this."
)
@click.option("--rolled", is_flag=True, help="One node per op of a loop (with pass counts).")
@click.option(
    "--direction",
    type=click.Choice(["TB", "LR", "BT", "RL"]),
    default="TB",
    show_default=True,
    help="Graph layout: top-to-bottom, left-to-right, or their reverses.",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Also write the graph JSON."
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="Re-run every op from its saved inputs and compare with the traced output.",
)
@click.option(
    "--stats",
    is_flag=True,
    help="Also print each op's mean, std, min, max and fraction of zeros (a layer whose "
    "values explode or whose ReLU never fires).",
)
@device_option
@_friendly
def trace(
    model: str,
    input_shape: str,
    input_dtype: str | None,
    weights: str | None,
    out: str,
    depth: int | None,
    rolled: bool,
    direction: str,
    json_out: str | None,
    validate: bool,
    stats: bool,
    device: str,
) -> None:
    """Trace MODEL on random inputs: print a summary, draw the graph, validate, and name
    the first op whose output is NaN or inf, if any.

    MODEL is torchvision:NAME, timm:NAME, package.module:callable or path/file.py:callable.
    torchvision:NAME is any classification, detection, segmentation, video or optical-flow
    model of torchvision.models.list_models(), random-init: nothing is downloaded (pass
    --weights for a local state dict).
    """
    import torch

    from . import trace as do_trace
    from .models import example_inputs, load_model, parse_inputs
    from .render.graphviz import FORMATS

    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:  # before the model is built and traced, not after
        raise click.BadParameter(
            f"cannot draw to '{out}': the graph is written as {', '.join(FORMATS)} "
            f"(got '{suffix or 'no suffix'}'); e.g. --out {Path(out).stem or 'graph'}.svg",
            param_hint="'--out'",
        )
    out = _out_folder(out, "'--out'")
    if json_out:
        json_out = _out_folder(json_out, "'--json'")
    specs = parse_inputs(input_shape, input_dtype)
    net = load_model(model, weights, device=device)
    inputs = example_inputs(specs, device=device)
    with torch.no_grad():
        tr = do_trace(net, *inputs)
    click.echo(tr.summary(depth=depth))
    if validate:
        report = tr.validate()
        click.secho(f"validation: {report}", fg="green")
    first = tr.first_nonfinite()
    masks = tr.masked_infs()  # an attention mask's -inf, made 0 by its softmax: by design
    if first is None and not masks:
        click.echo("non-finite: none (every op's output is finite)")
    elif first is None:
        click.echo("non-finite: none (every other op's output is finite)")
    else:
        click.secho(f"non-finite: {first}", fg="yellow")
    for mask in masks:
        click.echo(f"by design: {mask}")
    if stats:
        click.echo(_stats_table(tr))
    path = tr.render(out, depth=depth, rolled=rolled, direction=direction)
    click.echo(f"graph: {path}")
    if json_out:
        tr.to_json(json_out)
        click.echo(f"json: {Path(json_out)}")


@main.command()
@click.argument("model")
@click.option(
    "--data",
    "-d",
    required=True,
    help="'digits', 'digits:train', 'digits:test', an image folder: DIR/<class>/<image> "
    "(unreadable files are skipped and listed), or code that makes any dataset of (input, "
    "label) pairs, as MODEL takes a model: 'path/to/file.py:make_dataset' or "
    "'package.module:make_dataset' (token ids, feature vectors, ...).",
)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run dir.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="State dict to load.")
@click.option(
    "--layers",
    "-l",
    multiple=True,
    help="Layers to probe (op labels, module paths, module types or op names; globs); "
    "repeatable or comma-separated. Default: the convs, linears and activations (CNNs), or "
    "the blocks' outputs and MLP hidden layers (transformers); see docs/probe.md.",
)
@click.option(
    "--k",
    "-k",
    "k",
    type=click.IntRange(min=1),
    default=9,
    show_default=True,
    help="Top-k samples kept per unit.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=224,
    show_default=True,
    help="Images are resized (shorter side) to this, then center-cropped to a square "
    "(image folders and the digits; a dataset made by code is fed at its own size).",
)
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images per forward pass.",
)
@device_option
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="DataLoader worker processes.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run of another model in --out, or sweep a finished run again.",
)
@click.option(
    "--unit-dim",
    multiple=True,
    metavar="[LAYER=]AXIS",
    help="The axis holding the units (counting the batch axis; -1 = last), for every layer "
    "or for layers matching LAYER (globs allowed); repeatable. For layers lurker cannot read.",
)
@click.option(
    "--relevance",
    is_flag=True,
    help="Also rank each unit's samples by its LRP relevance for the model's prediction "
    "(relevance-max lists; one LRP backward per batch).",
)
@click.option(
    "--relevance-composite",
    type=click.Choice(["epsilon_plus_flat", "epsilon_gamma_box", "alpha2_beta1", "epsilon"]),
    help="As --relevance, with this LRP composite (default: epsilon_plus_flat; epsilon for "
    "transformers).",
)
@click.option(
    "--embed",
    is_flag=True,
    help="Also keep every sample's features at the penultimate layer (the input of the last "
    "linear op) with the model's prediction, for the dataset map (`lurker map`).",
)
@click.option(
    "--embed-layer",
    metavar="LAYER",
    help="As --embed, at this layer (mean-pooled over its positions).",
)
@_channel_dim_option(
    "Recorded in the run, so its images and `lurker serve` feed the model the same way. "
    "Default: (N, C, H, W)."
)
@click.option(
    "--normalize",
    metavar="imagenet|none|raw|MEAN/STD",
    default=None,
    help="How an image folder's images are normalised before the model sees them: "
    + NORMALIZE_CHOICES
    + " It must be what the model was trained on. Recorded in the run.",
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False),
    help="A text model's vocabulary, stored in the run: one token per line (line i: id i), "
    "a JSON list, or a JSON {token: id} object (default: the dataset's vocab or itos "
    "attribute). The pages show the words of the token ids.",
)
@_friendly
def probe(
    model: str,
    data: str,
    out: str,
    weights: str | None,
    layers: tuple[str, ...],
    k: int,
    image_size: int,
    batch_size: int,
    device: str,
    workers: int,
    overwrite: bool,
    unit_dim: tuple[str, ...],
    relevance: bool,
    relevance_composite: str | None,
    embed: bool,
    embed_layer: str | None,
    channel_dim: int | None,
    normalize: str | None,
    vocab: str | None,
) -> None:
    """Sweep a dataset through MODEL; keep what every unit of every layer responds to.

    Ctrl-C (or SIGTERM) stops after the batch in progress, which is saved; rerun the
    same command after an interruption (or a kill) to resume. Under torchrun each process
    sweeps a shard and the results are merged; resume with as many processes.
    """
    from .models import channels_first_view, image_channels, load_model
    from .probe import data as pdata
    from .probe import probe as do_probe
    from .probe.sweep import before_sweep
    from .specs import absolute_spec
    from .vocab import read_vocab

    out = str(Path(out).expanduser())  # --out=~/runs/x: the shell leaves ~ after = alone
    if normalize is not None:  # a typo is said before the model is loaded
        normalize = pdata.parse_normalize(normalize)
    words = None if vocab is None else read_vocab(vocab)  # as is a bad vocabulary file
    code = pdata.is_code_spec(data)
    ctx = click.get_current_context()
    if code and ctx.get_parameter_source("image_size") is not click.core.ParameterSource.DEFAULT:
        # items made by code are fed as they are: a size the user asked for, not applied,
        # would silently probe other images than they meant (said before the model loads)
        raise click.BadParameter(
            f"a dataset made by code ({data}) is fed as its items are, at their own size; "
            "--image-size applies to image folders and the digits (resize in the dataset, "
            "or leave it out)",
            param_hint="'--image-size'",
        )
    with _stopped_quietly(), _torchrun_group(device):
        # a signal while the model and the dataset load says what one during the probe's
        # own setup does: nothing was swept, nothing is lost (as docs/probe.md shows)
        with before_sweep():
            net = load_model(model, weights, device=device)
            channels = None
            if not code:  # the digits and folders are images made for the model's channels
                where = next((p.device for p in net.parameters()), "cpu")  # probed where it is
                # (the probe makes its own view: given the model, its errors can name the fix)
                view = channels_first_view(net, channel_dim)
                channels = image_channels(view, image_size, device=where)
            ds = pdata.load_dataset(data, image_size, channels=channels, normalize=normalize)
            if isinstance(ds, pdata.ImageFolderDataset):  # recorded as applied, said at once
                default = normalize is None
                normalize = normalize or pdata.default_normalize(len(ds.mean))
                if int(os.environ.get("RANK", "0")) == 0:  # once, under torchrun too
                    click.echo(_normalize_note(normalize, ds.mean, ds.std, default), err=True)
            # a dataset made by code is checked to be the same when read again
            fingerprint = {"data_fingerprint": pdata.fingerprint(ds)} if code else {}
        run = do_probe(
            net,
            ds,
            out=out,
            layers=_names(layers) or None,
            k=k,
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            overwrite=overwrite,
            unit_dim=_unit_dims(unit_dim),
            relevance=relevance_composite or relevance,
            embed=embed_layer or embed,
            channel_dim=channel_dim,
            vocab=words,
            meta={
                "model_spec": absolute_spec(model),  # found again from any directory
                "weights": str(Path(weights).resolve()) if weights else None,
                "data": _data_spec(data),
                **fingerprint,
                # how the folder's images were normalised: its readers reload it so
                "normalize": normalize or "none",
            },
        )
    if run is not None:  # rank 0
        n = sum(layer.num_units for layer in run.layers)
        click.echo(f"run: {run.path} ({len(run.layers)} layers, {n} units)")
        if run.skipped:
            shown = "; ".join(f"{path} ({why})" for path, why in run.skipped[:5])
            more = f"; and {len(run.skipped) - 5} more" if len(run.skipped) > 5 else ""
            click.secho(
                f"skipped {len(run.skipped)} unreadable image{'s' if len(run.skipped) != 1 else ''}"
                f" (listed in the run: run.skipped): {shown}{more}",
                fg="yellow",
            )
        if run.has_embedding:
            e = run.meta.get("embedding") or {}
            click.echo(f"features of {e.get('layer')} ({e.get('dim')} per sample) kept for the map")
        lost = run.meta.get("skipped_layers") or []
        from .probe.layout import UNIT_DIM_HINT

        # only a unit axis lurker cannot tell is something --unit-dim can name; a batch
        # folded with heads or windows is not (its reason names a layer to probe instead)
        axis = [s["layer"] for s in lost if str(s.get("reason", "")).endswith(UNIT_DIM_HINT)]
        other = [s["layer"] for s in lost if s["layer"] not in axis]
        if axis:
            click.secho(
                f"skipped {len(axis)} layers whose unit axis lurker cannot tell (listed in "
                "the run; name the axis with --unit-dim LAYER=AXIS): " + ", ".join(axis),
                fg="yellow",
            )
        if other:
            click.secho(
                f"skipped {len(other)} layers that cannot be probed as they are (why, and "
                "for a folded batch which layer to probe instead, is printed above and listed "
                "in the run): " + ", ".join(other),
                fg="yellow",
            )
        # layers left without a receptive field (no crop), grouped by the op that broke it
        gaps: dict[str, list[str]] = {}
        for layer in run.layers:
            boxed = isinstance(layer.layout, dict) and layer.layout.get("boxes") is not None
            if layer.rf is None and layer.rf_reason and not boxed:  # tokens crop their patch
                gaps.setdefault(layer.rf_reason, []).append(layer.name)
        for why, names in gaps.items():
            click.echo(f"no receptive field (no crop) for {', '.join(names)}: {why}")


def _names(values: tuple[str, ...]) -> list[str]:
    """A repeatable option's names, each value also split at commas (``--layers c1,c2``,
    as ``--kinds`` and ``--methods`` take them; no layer name holds a comma), except a
    comma inside a glob's brackets (``features.[0,3]``)."""
    out: list[str] = []
    for v in values:
        part, depth = "", 0
        for ch in v:
            if ch == "," and not depth:
                out.append(part)
                part = ""
                continue
            depth = 1 if ch == "[" else 0 if ch == "]" else depth
            part += ch
        out.append(part)
    return [n.strip() for n in out if n.strip()]


def _channel_axis(value: int | None) -> int | None:
    """``--channel-dim``, checked as the commands that feed images take it: an axis of an
    image batch other than the batch's."""
    from .models import IMAGE_CHANNEL_DIMS

    if value is not None and value not in IMAGE_CHANNEL_DIMS:
        raise click.BadParameter(
            f"{value}: an image batch has axes 0 (the batch) to 3: give 1 for (N, C, H, W) "
            "or -1 (3) for (N, H, W, C)",
            param_hint="'--channel-dim'",
        )
    return value


def _normalize_note(spec: str, mean: Sequence[float], std: Sequence[float], default: bool) -> str:
    """The line the probe says at its start: the normalisation is the most common silent
    mistake (a model trained on other inputs gets every number of the run wrong)."""
    stats = f"mean {', '.join(f'{v:g}' for v in mean)}, std {', '.join(f'{v:g}' for v in std)}"
    how = "the default for this model's channels" if default else "--normalize"
    what = {
        "imagenet": f"with ImageNet's statistics ({stats}; {how})",
        "none": f"not normalised: fed in [0, 1] ({how})",
        "raw": "fed raw: uint8 tensors of their 0..255 values, not scaled nor normalised "
        "(--normalize raw)",
    }.get(spec, f"with {stats} (--normalize)")
    return (
        f"lurker: images {what}. They must be fed as the model was trained: else give "
        "--normalize none (images in [0, 1]), --normalize raw (uint8, 0..255, for a model "
        "that scales them itself) or --normalize MEAN/STD (one value per channel)."
    )


def _data_spec(data: str) -> str:
    """The dataset spec a run records: a folder, or the file of a ``file.py:fn`` spec, as
    its absolute path, so that `lurker serve` and `lurker map` find it (and tell it from
    another folder) from any directory."""
    from .probe import data as pdata
    from .specs import absolute_spec

    if pdata.is_code_spec(data):
        return absolute_spec(data)
    path = Path(data).expanduser()
    return str(path.absolute()) if path.exists() else data


def _unit_dims(values: tuple[str, ...]) -> int | dict[str, int] | None:
    """``--unit-dim`` values (``AXIS`` or ``LAYER=AXIS``) as probe's ``unit_dim``."""
    if not values:
        return None
    named: dict[str, int] = {}
    every: int | None = None
    for v in values:
        pattern, _, axis = v.rpartition("=")
        try:
            n = int(axis)
        except ValueError:
            raise click.BadParameter(
                f"{v!r}: give an axis number (e.g. 3 or -1), or LAYER=AXIS "
                "(e.g. features.1.0.mlp.0=-1)",
                param_hint="--unit-dim",
            ) from None
        if pattern:
            named[pattern] = n
        else:
            every = n
    if not named:
        return every
    if every is not None:
        named["*"] = every  # last: a named layer's own axis wins
    return named


@contextlib.contextmanager
def _stopped_quietly() -> Iterator[None]:
    """A probe stopped by Ctrl-C or SIGTERM exits with 128 + the signal, as a shell does,
    with lurker's message only: the sweep has said what it kept and how to resume (once
    per job), and click would add "Aborted!" from every process. A SIGTERM while the
    model is loaded stops as Ctrl-C does, not silently."""
    from .probe import ProbeInterrupted
    from .probe.sweep import StopSignal, stops_on_sigterm

    try:
        with stops_on_sigterm():
            yield
    except ProbeInterrupted as stop:
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt as stop:  # before the probe, or a second Ctrl-C inside it
        signum = stop.signum if isinstance(stop, StopSignal) else 2  # (SIGINT)
        if int(os.environ.get("RANK", "0")) == 0:
            how = "stopped by SIGTERM" if signum == 15 else "interrupted"
            click.echo(
                f"lurker: {how}; the run keeps what its last checkpoint saved (nothing if "
                "it stopped before the sweep's first batch): run the same command again to "
                "resume",
                err=True,
            )
        raise SystemExit(128 + signum) from None


@contextlib.contextmanager
def _torchrun_group(device: str | None) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1), join the process group for the sweep's duration."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@main.command("map")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--layer",
    "-l",
    help="Layer whose features place the samples (default: the stored features, else the "
    "penultimate layer: the input of the last linear op).",
)
@click.option(
    "--method",
    type=click.Choice(["tsne", "umap", "pca"]),
    default="tsne",
    show_default=True,
    help="tsne (openTSNE when installed, else scikit-learn), umap (needs umap-learn) or pca.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same map.")
@click.option(
    "--model",
    "-m",
    "model_spec",
    metavar="SPEC",
    help="Model spec, when the run does not record one.",
)
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="State dict to load.")
@click.option("--data", "-d", help="Dataset, when the run does not record one.")
@device_option
@_friendly
def map_(
    run: str,
    layer: str | None,
    method: str,
    seed: int,
    model_spec: str | None,
    weights: str | None,
    data: str | None,
    device: str,
) -> None:
    """Place RUN's samples in 2-D by their features at one layer (the explorer's Map page).

    Uses the features the probe kept (`lurker probe --embed`); otherwise collects them in
    one pass with the model and dataset the run records (or --model/--data)."""
    from .map import holds_layer, make_map, umap_module
    from .store import Run

    if method == "umap":
        umap_module()  # said before a model or dataset is loaded
    model = dataset = None
    with Run.open(run) as r:
        size = (r.meta.get("image_size") or [224])[0]
        config = r.meta.get("config") or {}
        emb = (r.meta.get("embedding") or {}) if r.has_embedding else {}
        held = emb.get("layer")  # the stored features' layer
    if weights and not model_spec:  # the run's own model, with these weights
        model_spec = config.get("model_spec")
        if not model_spec:
            raise click.BadParameter(
                "the run does not record its model (it was probed from Python): give it with "
                "--model SPEC alongside --weights",
                param_hint="'--weights'",
            )
    if held and (layer is None or holds_layer(run, layer)) and (model_spec or data):
        click.echo(
            f"the run holds the features of {held}: the map uses them, so --model, --weights "
            "and --data are not needed (--layer L collects another layer's with them)"
        )
    elif model_spec or data:
        from .models import load_model
        from .probe import data as pdata

        if model_spec:
            model = load_model(model_spec, weights, device=device)
        if data:
            # a folder as the run's was fed; another dataset than the run's is refused by
            # make_map, naming it
            dataset = pdata.load_run_dataset(config, int(size), data)
    done = make_map(
        run, layer=layer, method=method, seed=seed, model=model, dataset=dataset, device=device
    )
    m = done.map()
    meta = m.meta
    click.echo(
        f"map of {len(m)} samples from {meta.get('layer')} by {meta.get('method')} "
        f"({meta.get('engine')}) in {meta.get('seconds', 0):.1f} s; open it: lurker serve {shlex.quote(run)}"
    )
    absent = sorted(set(range(done.num_samples)) - {int(i) for i in m.ids})
    if absent:
        shown = ", ".join(str(s.path if s.path else s.id) for s in done.samples(absent[:5]))
        click.echo(
            f"{len(absent)} of the run's {done.num_samples} samples are not on the map (their "
            f"images could not be read, or are no longer in the dataset): {shown}"
            + (", ..." if len(absent) > 5 else "")
        )
    if done.skipped:
        names = ", ".join(path for path, _ in done.skipped[:5])
        more = ", ..." if len(done.skipped) > 5 else ""
        click.echo(f"the probe could not read {len(done.skipped)} file(s): {names}{more}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--layers",
    "-l",
    multiple=True,
    help="Layers whose units' images to make (names, module paths, op labels or types; "
    "globs); repeatable or comma-separated. Default: all.",
)
@click.option(
    "--kinds",
    default="input,grad",
    show_default=True,
    help="Comma-separated, of input, grad, crop, grad_crop (crops are boxes the explorer "
    "cuts itself; files only when asked).",
)
@click.option(
    "--which",
    default="max,mean",
    show_default=True,
    help="Top lists, comma-separated: max, mean or max,mean.",
)
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Gradients per pass.",
)
@device_option
@click.option(
    "--explanations",
    default=None,
    metavar="top|N",
    help="Instead of unit images: explain dataset samples for their top class (a "
    "language model's: its top next token at the last position), as the Explain page does ('top': the samples some unit ranks in its top-k, those `lurker "
    "export` holds; N: samples 0..N-1). Served without running the model, exported by `lurker export`.",
)
@click.option(
    "--methods",
    default=None,
    help="With --explanations: comma-separated methods, and 'concepts' for the concept "
    "relevance the page shows first (default: all of them).",
)
@_friendly
def images(
    run: str,
    layers: tuple[str, ...],
    kinds: str,
    which: str,
    batch_size: int,
    device: str,
    explanations: str | None,
    methods: str | None,
) -> None:
    """Precompute the images of RUN's units: each top-k sample once, guided-backprop
    gradients (batched), crops if asked. Rerun after an interruption to resume.

    With --explanations, precompute the Explain page's explanations of dataset samples
    instead (heatmaps; per-token, per-feature or along-time scores on a run of token ids,
    feature vectors or signals), with the run's own model, into the run's cache/.

    The model is the one the run records (spec and weights); where it is not the model
    the run was probed with (the weights file changed since), nothing is made."""
    from .probe.views import UnitImages

    if methods is not None and explanations is None:
        raise click.BadParameter("--methods goes with --explanations top|N", param_hint="--methods")
    if explanations is not None:
        from .server.explained import precompute

        # the unit images' options do nothing here: say so, not ignore them
        ctx = click.get_current_context()
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("layers", "kinds", "which", "batch_size")
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.BadParameter(
                f"{', '.join(given)} choose{'s' * (len(given) == 1)} unit images, which "
                "--explanations does not make: run `lurker images` once with them and once "
                "with --explanations",
                param_hint="--explanations",
            )

        spec = explanations.strip()
        if spec != "top" and not (spec.isdigit() and int(spec) > 0):
            raise click.BadParameter(
                f"'top' or a number of samples (1 or more), not {explanations!r}",
                param_hint="--explanations",
            )
        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        if names == []:
            raise click.BadParameter(
                f"{methods!r} names no method: give them comma-separated (e.g. "
                "saliency,gradcam), or leave --methods out for every one",
                param_hint="--methods",
            )
        done = precompute(run, spec if spec == "top" else int(spec), names, device=device)
        by_reason: dict[str, list[str]] = {}  # (Grad-CAM and Grad-CAM++: one reason, said once)
        for method, why in done.skipped.items():
            by_reason.setdefault(why, []).append(method)
        for why, names in by_reason.items():
            click.echo(f"lurker: {', '.join(names)} left out: {why}", err=True)
        click.echo(
            f"{done.made} explanations made ({done.existing} already there) for "
            f"{done.samples} samples, explaining {done.explains}, in {done.seconds:.1f} s; "
            f"in {Path(run) / 'cache' / 'explain'}"
        )
        return
    unit_images = UnitImages(run, device=device, batch_size=batch_size)  # errors say what to pass
    result = unit_images.write_all(
        layers=_names(layers) or None, kinds=kinds.split(","), which=which.split(",")
    )
    click.echo(
        f"{result.made} images made ({result.existing} already there) in "
        f"{result.seconds:.1f} s: {result.rate:.1f} images/s; in {Path(run) / 'cache'}"
    )


@main.command(
    epilog="""\b
Examples:
  lurker serve runs/digits
  lurker serve runs/ --port 8000            # every run in the folder
  lurker serve runs/vgg --model torchvision:vgg16 --weights vgg16.pth
"""
)
@click.argument("run", type=click.Path(exists=True))
@click.option(
    "--model",
    "-m",
    default=None,
    metavar="SPEC",
    help="Model spec for the live views (default: the one the run records, if any). It must "
    "be the model the run was probed with: one whose fingerprint differs from the run's is "
    "never run (the live views say so).",
)
@click.option(
    "--weights",
    "-w",
    type=click.Path(dir_okay=False),
    help="State dict to load: the one the probe loaded (other weights are refused).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind; 0.0.0.0 makes the explorer reachable from other machines.",
)
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default 8765, or a free one when it is taken; 0: any free port).",
)
@click.option("--no-browser", is_flag=True, help="Do not open a browser.")
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False),
    help="A text model's vocabulary: one token per line (line i: id i), a JSON list, or a JSON {token: id} object. The pages show the words of the token ids (in place of any the run stores; refused for a folder of several runs of token ids).",
)
@device_option
@_friendly
def serve(
    run: str,
    model: str | None,
    weights: str | None,
    host: str,
    port: int | None,
    no_browser: bool,
    vocab: str | None,
    device: str | None,
) -> None:
    """Open the explorer on RUN (a run directory, or a folder of runs) in the browser.

    Prints the URL and serves until Ctrl-C. Without --model, the live views use the model
    the run records (runs made by `lurker probe`); everything precomputed works without one.
    A model that is not the one the run was probed with (its fingerprint differs: other
    weights, a weights file trained again since) is never run: the live views say why.
    """
    from .server.serve import serve_forever
    from .vocab import read_vocab

    if weights is not None and model is None:
        raise click.BadParameter(
            "a state dict needs the model it loads into: pass --model SPEC with --weights "
            "(for the run's own model, the spec `lurker probe` was given)",
            param_hint="'--weights'",
        )
    serve_forever(
        run,
        model=model,
        weights=weights,
        host=host,
        port=port,
        browser=not no_browser,
        device=device,
        vocab=None if vocab is None else read_vocab(vocab),
    )


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.argument("site", type=click.Path(file_okay=False))
@click.option(
    "--no-images",
    is_flag=True,
    help="Export only the images already cached; do not make the top samples' images "
    "from the dataset first.",
)
@_friendly
def export(run: str, site: str, no_images: bool) -> None:
    """Write RUN's explorer as a static site to SITE (no Python needed to view it).

    Everything precomputed is exported: the run's JSON documents, each top-k sample's
    image (made from the run's dataset when it can be loaded; the pages cut crops from it),
    the cached gradients (make them first with `lurker images RUN`) and the cached
    explanations (`lurker images RUN --explanations top`). View it with any static file server, e.g.
    `python -m http.server -d SITE`. The live views need `lurker serve RUN` (and
    `--model SPEC` where the run records no model).
    SITE is a new or empty folder, or an earlier export: what that export wrote (listed in
    SITE/.lurker-export.json) is replaced, any other file there is kept.
    """
    from .server.export import export_site

    out = export_site(run, site, make_images=not no_images)
    click.echo(f"site: {out} (open it with: python -m http.server -d {shlex.quote(str(out))})")


@main.command(
    epilog="""\b
Examples:
  lurker explain torchvision:resnet18 --image cat.jpg --method gradcam --target top
  lurker explain net.py:Net -w net.pt --image 7.png --image-size 16 \\
      --method integrated_gradients --target 7 --option n_steps=32
  lurker explain net.py:Net -w net.pt --image 7.png --target features.8:5 --out unit.png
  lurker explain net.py:Net -w net.pt --image 7.png --method gradcam --evaluate
  lurker explain runs/digits --image 7.png --target 3   # the run's model, fed as probed
"""
)
@click.argument("model")
@click.option("--image", required=True, type=click.Path(dir_okay=False), help="Image file.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="State dict to load.")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="The image is resized (shorter side) and centre-cropped to this (default: a run's "
    "image size, else 224).",
)
@click.option(
    "--method",
    default="saliency",
    show_default=True,
    help="Attribution method (listed above). Not -m: that is --model, as in every command.",
)
@click.option(
    "--model",
    "-m",
    "model_spec",
    default=None,
    metavar="SPEC",
    callback=lambda ctx, param, value: _not_a_method(value),
    help="With a run as MODEL: the model spec (default: the run's), as for `lurker featviz`.",
)
@click.option(
    "--target",
    "-t",
    default="top",
    show_default=True,
    help="Class index, 'top' (top predicted class), or a unit LAYER:CHANNEL[:Y:X] "
    "(module path or trace label).",
)
@click.option("--layer", "-l", default=None, help="Grad-CAM's layer (module path or trace label).")
@click.option(
    "--unit-dim",
    type=int,
    default=None,
    metavar="AXIS",
    help="For a unit --target on a layer whose unit axis lurker cannot tell: the axis of its "
    "output that holds the units (counting the batch axis).",
)
@_channel_dim_option(
    "The image is given to the model so. Default: (N, C, H, W), or with a run as MODEL the run's."
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method option, e.g. n_steps=32 or window=16; repeatable.",
)
@click.option(
    "--normalize",
    metavar="imagenet|none|raw|MEAN/STD",
    default=None,
    help="How the image is normalised for the model (as `lurker probe --normalize`): "
    + NORMALIZE_CHOICES
    + " With a run as MODEL: the run's.",
)
@click.option("--mean", default=None, hidden=True)  # before --normalize: MEAN of MEAN/STD
@click.option("--std", default=None, hidden=True)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Heatmap opacity at its strongest (Explanation.overlay's and the Explain page's default).",
)
@click.option(
    "--out",
    "-o",
    default="heat.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The heatmap over the image: .png, .jpg or .webp.",
)
@device_option
@click.option(
    "--evaluate",
    "evaluate_",
    is_flag=True,
    help="Also print the explanation's deletion and insertion AUC (lurker.explain.evaluate).",
)
@_friendly
def explain(
    model: str,
    image: str,
    weights: str | None,
    image_size: int,
    method: str,
    model_spec: str | None,
    target: str,
    layer: str | None,
    unit_dim: int | None,
    channel_dim: int | None,
    options: tuple[str, ...],
    normalize: str | None,
    mean: str | None,
    std: str | None,
    alpha: float,
    out: str,
    device: str,
    evaluate_: bool,
) -> None:
    """Explain MODEL's decision on one image: write the heatmap over the image to --out.

    MODEL is a spec as for `lurker trace`, or a run directory of `lurker probe` (its model
    and weights, fed the image as its probe fed its own: size, channel axis and
    normalisation). Methods: saliency, input_x_gradient,
    guided_backprop, deconvnet, integrated_gradients, smoothgrad, gradcam,
    gradcam_plus_plus, occlusion, lrp; see docs/explain.md.
    """
    from . import explain as explain_pkg
    from .explain.cli import (
        check_runs,
        image_channels_at,
        load_image,
        parse_options,
        parse_target,
    )
    from .models import image_channels, load_model
    from .store.schema import DB_NAME

    if method not in explain_pkg.METHODS:  # before the model is built
        raise LurkerError(
            f"unknown explanation method {method!r}; supported: " + ", ".join(explain_pkg.METHODS)
        )
    if Path(out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise click.BadParameter(
            f"{out!r}: the overlay is an image: .png, .jpg or .webp", param_hint="'--out'"
        )
    out = _out_folder(out, "'--out'")
    opts = parse_options(options, method)
    if layer is not None:
        opts["layer"] = layer
    goal = parse_target(target)
    normalize = _explain_normalize(normalize, mean, std)
    run_dir = Path(model).expanduser()
    model, weights, image_size, channel_dim, normalize = _explain_run(
        model, weights, image_size, channel_dim, normalize, model_spec
    )
    if unit_dim is not None:
        if not isinstance(goal, explain_pkg.UnitTarget):
            raise click.BadParameter(
                "--unit-dim says where a layer's units are: it needs a unit --target LAYER:CHANNEL",
                param_hint="'--unit-dim'",
            )
        goal = dataclasses.replace(goal, unit_dim=unit_dim)
    if evaluate_ and isinstance(goal, explain_pkg.UnitTarget):
        raise click.BadParameter(
            "deletion and insertion follow a class's probability: --evaluate needs a class "
            "--target (an int or top), not a unit",
            param_hint="'--evaluate'",
        )
    net = load_model(model, weights, device=device)
    if (run_dir / DB_NAME).is_file():  # explained as the run's model: it must be that one
        _refuse_other_model(net, run_dir, model, weights)
    if channel_dim is None or channel_dim == 1:
        channels = image_channels(net, image_size, device=device) or 3
    else:
        channels = image_channels_at(net, image_size, channel_dim, device=device)
    x, shown = load_image(Path(image).expanduser(), image_size, channels, normalize)
    if channel_dim is not None:  # the model's own layout; the overlay's picture the same
        x = x.movedim(1, channel_dim).contiguous()
        shown = shown.movedim(0, channel_dim - 1 if channel_dim > 0 else channel_dim)
    x = x.to(device)
    check_runs(net, x, image_size)
    try:
        e = explain_pkg.explain(net, x, target=goal, method=method, channel_dim=channel_dim, **opts)
    except LurkerError as err:
        unit = goal if isinstance(goal, explain_pkg.UnitTarget) else None
        head, _, tail = unit.layer.rpartition(":") if unit is not None else ("", "", "")
        unknown = isinstance(err.__cause__, OpKeyError)  # no such layer in the model
        if unit and unit.y is None and head and tail.isdigit() and unknown:
            # LAYER:CHANNEL:Y without X reads as the layer LAYER:CHANNEL (labels hold ':')
            raise LurkerError(
                f"--target {target!r} reads as layer {unit.layer!r}, channel {unit.channel}, "
                f"and the model has no layer {unit.layer!r}: a unit is LAYER:CHANNEL, or "
                f"LAYER:CHANNEL:Y:X with both Y and X (e.g. {head}:{tail}:{unit.channel}:0)."
            ) from err
        raise
    e.overlay(0, image=shown, alpha=alpha).save(out)
    what = (
        f"unit {e.target}"
        if isinstance(e.target, explain_pkg.UnitTarget)
        else (f"class {e.target[0]}")
    )
    extra = ""
    if e.delta is not None:
        extra = f", convergence delta {float(e.delta[0]):.3g}"
    click.echo(f"{method} of {what}{extra}: {out}")
    if evaluate_:
        ev = explain_pkg.evaluate(net, x, e, metrics=("deletion", "insertion"))
        assert ev.deletion is not None and ev.insertion is not None
        click.echo(
            f"deletion AUC {float(ev.deletion.auc[0]):.4f} (lower is better), "
            f"insertion AUC {float(ev.insertion.auc[0]):.4f} (higher is better)"
        )


def _not_a_method(value: str | None) -> str | None:
    """``lurker explain -m gradcam``, as typed before ``-m`` meant ``--model`` in every
    command: one line naming the change and what to type, not "no such model gradcam"."""
    from .explain import METHODS

    if value is not None and value in METHODS:
        raise click.UsageError(
            f"-m is --model (as in every lurker command); choose the method with --method {value}"
        )
    return value


def _explain_normalize(normalize: str | None, mean: str | None, std: str | None) -> str | None:
    """``--normalize`` checked, or the older ``--mean``/``--std`` as its MEAN/STD."""
    from .probe import data as pdata

    if mean is None and std is None:
        return None if normalize is None else pdata.parse_normalize(normalize)
    if normalize is not None or mean is None or std is None:
        raise click.BadParameter(
            "give the normalisation as --normalize MEAN/STD (e.g. 0.5,0.5,0.5/0.25,0.25,0.25)"
            + (" alone, not with --mean/--std" if normalize is not None else ""),
            param_hint="'--mean'/'--std'",
        )
    return pdata.parse_normalize(f"{mean}/{std}")


def _explain_run(
    model: str,
    weights: str | None,
    image_size: int | None,
    channel_dim: int | None,
    normalize: str | None,
    model_spec: str | None = None,
) -> tuple[str, str | None, int, int | None, str | None]:
    """``lurker explain RUN``: the model spec (``--model`` wins), weights, image size,
    channel axis and normalisation the run's probe recorded (each given option wins); a
    model spec as is, 224 px."""
    from .store.schema import DB_NAME

    where = Path(model).expanduser()
    if not (where / DB_NAME).is_file():
        if model_spec is not None:
            raise click.BadParameter(
                f"MODEL {model!r} is not a run, and --model/-m replaces a run's model "
                f"(`lurker explain RUN -m SPEC`): give one model. If {model_spec!r} was "
                "meant as the method: -m is --model in every lurker command; choose the "
                "method with --method",
                param_hint="'--model'",
            )
        return model, weights, image_size or 224, channel_dim, normalize
    from .probe import data as pdata
    from .server.state import signal_shape, token_length, vector_length
    from .store import Run

    with Run.open(where) as run:
        cfg = run.meta.get("config") or {}
        size = run.meta.get("image_size") or [224]
        tokens, vector, signal = token_length(run), vector_length(run), signal_shape(run)
    if tokens is not None or vector is not None or signal is not None:
        # its model does not read an image: said before it is built, with where it explains
        kind = (
            f"sequences of {tokens} token ids"
            if tokens is not None
            else f"vectors of {vector} features"
            if vector is not None
            else "signals (channels by time)"
        )
        raise LurkerError(
            f"run {where}'s inputs are {kind}, not images, and lurker explain reads an "
            f"image: `lurker images {shlex.quote(str(where))} --explanations N` explains "
            "its dataset samples 0..N-1 for the explorer's Explain page (one score per "
            "token, feature or time step), and lurker.explain(model, x) any input in Python."
        )
    spec, weights = _recorded_model(
        where, cfg, model_spec, weights, "pass it: --model SPEC [--weights FILE]"
    )
    if normalize is None:
        normalize = pdata.recorded_normalize(cfg)  # as the probe fed its images
    if channel_dim is None:
        channel_dim = cfg.get("channel_dim")
    return spec, weights, image_size or int(size[0]), channel_dim, normalize


def _recorded_model(
    where: Path, cfg: dict[str, Any], model: str | None, weights: str | None, fix: str
) -> tuple[str, str | None]:
    """The model spec and weights that build a run's model: ``model`` and ``weights`` as
    given, else what its probe recorded (``config``), refused with the fix when the run
    records no model or its recorded weights are gone."""
    spec = model or cfg.get("model_spec")
    if not spec:
        raise LurkerError(
            f"run {where} does not record its model (it was probed from Python): {fix}"
        )
    weights = weights or (None if model else cfg.get("weights"))
    if weights and weights == cfg.get("weights") and not Path(weights).is_file():
        raise LurkerError(
            f"the run's recorded weights {weights} do not exist here (moved or deleted): pass "
            "them with --weights"
        )
    return spec, weights


def _refuse_other_model(net: Any, run: Path, spec: str, weights: str | None) -> None:
    """Refuse a model other than the one ``run`` was probed with (its recorded fingerprint
    differs): what it makes would be shown or stored as the run's."""
    from .probe.identity import model_mismatch
    from .store import Run

    with Run.open(run) as r:
        why = model_mismatch(net, r.meta, run, spec, weights)
    if why is not None:
        raise LurkerError(why[0].upper() + why[1:])


@main.command(
    epilog="""\b
Examples:
  lurker featviz runs/digits --layer features.8             # every unit, stored in the run
  lurker featviz runs/digits --layer features.8 --units 0-7 --steps 128
  lurker featviz torchvision:vgg11 -w vgg11.pth --layer features.10 --units 3,7 --out fv/
"""
)
@click.argument("run_or_model")
@click.option(
    "--layer",
    "-l",
    required=True,
    help="Module path or trace label; with a run, one of its probed layers (name, op label "
    "or module path).",
)
@click.option("--units", "-u", default=None, help="Units, e.g. 0,3,8-15 (default: all).")
@click.option(
    "--steps",
    "-n",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Optimisation steps per image.",
)
@click.option(
    "--image-size",
    "size",
    type=click.IntRange(min=2),
    default=None,
    help="Image side (default: the run's, or 128).",
)
@click.option("--size", "old_size", type=click.IntRange(min=2), default=None, hidden=True)
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    default=None,
    help="Input channels (default: the run's, or the first conv's).",
)
@click.option(
    "--objective",
    type=click.Choice(["channel", "neuron"]),
    default="channel",
    show_default=True,
    help="channel: the unit's mean over positions; neuron: the unit at the map's centre "
    "(on a ViT's tokens: the central patch token).",
)
@click.option(
    "--param",
    type=click.Choice(["fourier", "maco"]),
    default="fourier",
    show_default=True,
    help="fourier: Lucid's 1/f spectrum; maco: phase only, fixed magnitude (Fel et al. 2023).",
)
@click.option(
    "--images-per-unit",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images optimized per unit, pushed apart by --diversity.",
)
@click.option(
    "--diversity",
    type=click.FloatRange(min=0),
    default=None,
    help="Weight of the term pushing a unit's images apart (default 100 with several "
    "images per unit); in the layer's activation units: lower it when the images stop "
    "exciting the unit.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds each image's start and transforms per (seed, unit, copy): same seed, same images.",
)
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=None,
    help="Images per forward (default: as many as fit in memory).",
)
@click.option(
    "--model",
    "-m",
    default=None,
    metavar="SPEC",
    help="With a run: the model spec (default: the run's).",
)
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="State dict to load.")
@device_option
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False),
    default=None,
    help="For a model (not a run): folder for the PNGs and activations.json (default featviz/).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="With a run: make again the units it already holds with these settings (by "
    "default a rerun skips them, so an interrupted command resumes).",
)
@click.option(
    "--normalize",
    default=None,
    metavar="imagenet|none|raw|MEAN/STD",
    help="For a model spec: the normalisation its inputs were trained with: "
    + NORMALIZE_CHOICES
    + " A run feeds the model as its probe did.",
)
@click.option(
    "--amplitude",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Signals only (a Conv1d model of (C, T)): the most a signal's value may reach "
    "either way, in the model's input units (default: each channel's range over the "
    "dataset, as the probe recorded it; 3 on a run that recorded none).",
)
@_friendly
def featviz(
    run_or_model: str,
    layer: str,
    units: str | None,
    steps: int,
    size: int | None,
    old_size: int | None,
    channels: int | None,
    objective: str,
    param: str,
    images_per_unit: int,
    diversity: float | None,
    seed: int,
    batch_size: int | None,
    model: str | None,
    weights: str | None,
    device: str,
    out: str | None,
    overwrite: bool,
    normalize: str | None,
    amplitude: float | None,
) -> None:
    """Optimize images that excite units of a layer (Lucid-style feature visualization).

    RUN_OR_MODEL is a run directory (the images and the activation each reached are
    stored in the run, for the explorer and `lurker export`; the model, input size,
    channels and normalisation come from the run) or a model spec as for `lurker trace`
    (the images go to --out). Rerun the same command after an interruption to resume:
    units the run holds with the same settings are skipped (--overwrite makes them
    again). See docs/featviz.md.
    """
    import json

    from .featviz import featviz as do_featviz
    from .models import load_model
    from .store.schema import DB_NAME

    unit_list = _unit_list(units)
    if old_size is not None:  # --size: the option's name before --image-size (as probe's)
        if size is not None:
            raise click.BadParameter(
                "--size is the old name of --image-size: give one", param_hint="'--image-size'"
            )
        size = old_size
    where = Path(run_or_model).expanduser()
    is_run = (where / DB_NAME).is_file()
    pathlike = where.exists() or run_or_model.startswith(("~", ".")) or "/" in run_or_model
    if not is_run and (where.is_dir() or (":" not in run_or_model and pathlike)):
        # a model spec holds ':' (torchvision:NAME, file.py:callable): this was meant as a run
        why = f"no {DB_NAME} in it" if where.is_dir() else "it is a file"
        raise LurkerError(
            f"{run_or_model} is not a run directory ({why if where.exists() else 'no such folder'}"
            "): RUN_OR_MODEL is the --out folder of `lurker probe`, or a model spec such as "
            "torchvision:resnet18 or path/to/net.py:Net"
        )
    if is_run:
        run_or_model = str(where)
        from .store import Run

        if out is not None:
            raise click.BadParameter(
                "the images of a run are stored in the run; --out is for a model spec",
                param_hint="'--out'",
            )
        if normalize is not None:
            raise click.BadParameter(
                "a run's model is fed as its probe fed it (the run records that); "
                "--normalize is for a model spec",
                param_hint="'--normalize'",
            )
        with Run.open(run_or_model) as run:
            info = run.layer(layer)  # before the model is built
            cfg = run.meta.get("config") or {}
            spec, weights = _recorded_model(
                run.path, cfg, model, weights, "pass it: --model SPEC [--weights FILE]"
            )
            from .models import channels_first_view

            # optimised (N, C, H, W) images fed as the probe fed them (a channels-last model)
            net = channels_first_view(
                load_model(spec, weights, device=device), cfg.get("channel_dim")
            )
            _refuse_other_model(net, run.path, spec, weights)
            saved: list[int] = []

            def store(part: Any) -> None:
                part.save(run_or_model)
                saved.extend(part.units)

            # each finished chunk is stored at once: an interrupted run keeps those units
            with _kept_on_interrupt(
                saved,
                f"stored in {run_or_model}",
                "Run the same command again to make the rest (it skips the units the run "
                "holds with these settings).",
            ):
                fv = do_featviz(
                    net, info.name, unit_list, objective=objective, steps=steps,
                    size=size, channels=channels, param=param,
                    images_per_unit=images_per_unit, diversity=diversity, seed=seed,
                    batch_size=batch_size, run=run, progress=_progress, on_chunk=store,
                    resume=not overwrite, log=_say, amplitude=amplitude,
                )  # fmt: skip
        where = f"stored in {run_or_model}"
    else:
        if model is not None:
            raise click.BadParameter(
                f"--model replaces a run's model; {run_or_model!r} is already the model spec "
                "(give one of them)",
                param_hint="'--model'",
            )
        if overwrite:
            raise click.BadParameter(
                "--overwrite is for a run (its stored units are skipped otherwise); a model "
                "spec's --out folder is always written anew",
                param_hint="'--overwrite'",
            )
        from .probe import data as pdata

        if normalize is not None:  # a typo is said before the model is loaded
            normalize = pdata.parse_normalize(normalize)
        net = load_model(run_or_model, weights, device=device)
        mean = std = None
        if normalize is not None:
            from .models import image_channels

            c = channels or image_channels(net, size or 64, device=device)
            if c is None:
                raise click.BadParameter(
                    "the model's input channels could not be found: give --channels",
                    param_hint="'--normalize'",
                )
            mean, std = pdata.normalize_stats(normalize, c)
            if normalize == "raw":  # the model gets 0..255 values, as a raw probe feeds it
                std = tuple(v / 255.0 for v in std)
        folder = Path(out or "featviz").expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        # a layer name as it is when it is a safe file name (`features.8`); else made one,
        # with a hash so no two layers share it (`layer1.0.relu:2`: Windows refuses `:`)
        from .store.files import safe_component

        name = safe_component(layer)
        done: dict[str, Any] = {"units": [], "activations": [], "settings": None}

        def write(part: Any) -> None:
            """The chunk's PNGs, and activations.json for every unit done so far."""
            for i, u in enumerate(part.units):
                for k in range(images_per_unit):
                    suffix = f"-{k}" if images_per_unit > 1 else ""
                    part.image(i, k).save(folder / f"{name}-{u:04d}{suffix}.png")
            done["units"] += part.units
            done["activations"] += part.activations.tolist()
            done["settings"] = part.settings
            (folder / "activations.json").write_text(
                json.dumps(
                    {"layer": layer, "objective": objective, "file_prefix": name, **done},
                    indent=1,
                )
            )

        with _kept_on_interrupt(
            done["units"],
            f"written to {folder}",
            "Run the command again with --units for the rest (into another --out: this "
            "one's activations.json is written anew).",
        ):
            fv = do_featviz(
                net, layer, unit_list, objective=objective, steps=steps, size=size,
                channels=channels, param=param, images_per_unit=images_per_unit,
                diversity=diversity, seed=seed, batch_size=batch_size, progress=_progress,
                on_chunk=write, mean=mean, std=std, amplitude=amplitude,
            )  # fmt: skip
        where = f"in {folder}"
    if not fv.units:
        click.echo(
            f"every unit asked for of {fv.layer} is already {where} with these settings; "
            "--overwrite makes them again"
        )
        return
    reached = fv.activations.reshape(len(fv.units), -1).mean(1)
    start = fv.start.reshape(len(fv.units), -1).mean(1)
    click.echo(
        f"{len(fv.units)} unit{'s' * (len(fv.units) != 1)} of {fv.layer}: activation {float(start.mean()):.3g} at the "
        f"random start, {float(reached.mean()):.3g} reached (mean over units); {where}"
    )


@contextlib.contextmanager
def _kept_on_interrupt(saved: list[int], where: str, rest: str) -> Iterator[None]:
    """Ctrl-C during `lurker featviz`: say which units' images were kept (exit status 130)."""
    from lurker.featviz.core import unit_ranges

    try:
        yield
    except KeyboardInterrupt:
        kept = f"units {unit_ranges(saved)} {where}" if saved else "no unit finished"
        click.echo(
            f"featviz: interrupted; {kept}. {rest}",
            err=True,
        )
        raise SystemExit(130) from None


def _unit_list(text: str | None) -> list[int] | None:
    """``--units`` ``0,3,8-15`` as a list of ints."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
            if dash and int(hi) < int(lo):
                raise ValueError(part)  # 5-3 would be no unit at all
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give unit indices and ranges, e.g. 0,3,8-15", param_hint="'--units'"
        ) from None
    return out


def _say(line: str) -> None:
    click.echo(f"featviz: {line}", err=True)


def _progress(done: int, total: int) -> None:
    click.echo(f"featviz: {done}/{total} units", err=True)


def _render_alias(**kwargs: Any) -> None:
    click.echo("`lurker render` is deprecated: use `lurker images` (same arguments).", err=True)
    images.callback(**kwargs)  # type: ignore[misc]


# "render" means drawing the graph; the old name of `images` is kept for one release.
main.add_command(
    click.Command(
        "render",
        params=images.params,
        callback=_render_alias,
        help="Deprecated: use `lurker images` (same arguments).",
        hidden=True,
    )
)


if __name__ == "__main__":
    main()
