"""The ``zoo`` command line: a thin click group over the library."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

import click

import zoo
from zoo.errors import ZooError

DEFAULT_ADAM_GRID = "5e-4,1e-3,2e-3,3e-3,5e-3,1e-2"  # {1,2,3,5}x10^k around Adam's usual optimum
TUNING_SEED = 10_000  # Adam's learning rate is chosen on this seed, never on a reported one


def _friendly(func):
    """Turn the library's own errors into one clean line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ZooError as error:
            raise click.ClickException(str(error)) from error

    return wrapper


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def _chunk_size(ctx, param, value: str) -> str:
    if value in ("auto", "off") or (value.isdigit() and int(value) > 0):
        return value
    raise click.BadParameter(f"expected auto, off or a positive integer, got {value!r}")


def _grid(ctx, param, value: str) -> list[float]:
    try:
        grid = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not grid or any(not (v > 0 and v != float("inf")) for v in grid):
        raise click.BadParameter(f"expected positive, finite learning rates, got {value!r}")
    return grid


def _command_line(name: str) -> str:
    """The command as typed, for records; rebuilt from the parsed options when zoo was not
    started from a shell (CliRunner, ``python -m``), where ``sys.argv`` is someone else's."""
    argv = sys.argv[1:]
    if name in argv:
        return "zoo " + " ".join(shlex.quote(a) for a in argv)
    ctx = click.get_current_context()
    parts = ["zoo", name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or value == param.default:
            continue
        if isinstance(param, click.Argument):
            parts.append(shlex.quote(str(value)))
        elif value is True:
            parts.append(param.opts[0])
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts += [param.opts[0], shlex.quote(shown)]
    return " ".join(parts)


def _writable_dir(path: Path, option: str = "--out") -> Path:
    """Check at startup that folder ``path`` can be created and written, leaving nothing.

    The missing parents are created, a probe folder is made and removed beside ``path``
    (inside it where it exists), then the created parents are removed again: ``os.access``
    alone passes for folders such as ``/proc/x`` that cannot be created.
    """
    import tempfile

    from zoo.safe_io import describe_os_error

    path = Path(path)
    hint = f"'{option}'"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing.is_file() else "is not a folder"
        raise click.BadParameter(f"{path}: {existing} {what}", param_hint=hint)
    base = path if path.is_dir() else path.parent
    missing = []
    walk = base
    while not walk.exists() and walk != walk.parent:
        missing.append(walk)
        walk = walk.parent
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name or 'zoo'}.probe-", dir=base))
    except OSError as error:
        raise click.BadParameter(
            f"{path} cannot be created or written: {describe_os_error(error)}", param_hint=hint
        ) from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return path


# One definition for every command that reads a dataset.
_data_root_option = click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help=(
        "Dataset root: MNIST in torchvision's layout, CIFAR-10 as an ImageFolder tree or its "
        "tarball, ImageNet as an ImageFolder root; default: $ZOO_DATA, zoo's cache, download, "
        "then (MNIST) the offline fallback."
    ),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(zoo.__version__, prog_name="zoo")
@click.option("-v", "--verbose", count=True, help="Show the library's log (-v info, -vv debug).")
def main(verbose: int) -> None:
    """zoo: learned optimizers with pretrained checkpoints."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------- list / info


@main.command("list")
@click.option(
    "--hub",
    "on_hub",
    is_flag=True,
    help="Also list the Hub's models tagged for zoo (library_name: zoo, tag learned-optimizer).",
)
@click.option("--search", default=None, help="With --hub: only repos whose id contains this text.")
@_friendly
def list_command(on_hub: bool, search: str | None) -> None:
    """List optimizers: shipped with zoo, in the Hugging Face cache, and (--hub) on the Hub."""
    from zoo.checkpoint import shipped_checkpoints
    from zoo.hub import cached_checkpoints, list_hub

    if search is not None and not on_hub:
        raise click.BadParameter("--search only applies with --hub", param_hint="--search")
    shipped = shipped_checkpoints()
    click.echo("shipped:" if shipped else "shipped: none found")
    for name, path in shipped.items():
        config = json.loads((path / "config.json").read_text())
        source = config.get("source_network", {})
        click.echo(
            f"  {name:<28} {config.get('features', {}).get('set', '?'):<3} "
            f"{source.get('name', '?')}/{source.get('dataset', '?'):<8} {path}"
        )
    cached = cached_checkpoints()
    click.echo("cached:" if cached else "cached: none")
    for entry in cached:
        refs = ", ".join(entry.refs) or "no branch"
        click.echo(f"  {entry.name:<28} {entry.pinned}  ({refs})")
    if on_hub:
        models = list_hub(search=search)
        click.echo("hub:" if models else "hub: no models tagged for zoo")
        for model in models:
            meta = model.zoo
            kinds = ",".join(meta.get("layer_kinds") or []) or "?"
            click.echo(
                f"  {model.ref:<40} {meta.get('source_network', '?')} {kinds} "
                f"features={meta.get('features', '?')} sha={(model.sha or '?')[:12]}"
            )


@main.command()
@click.argument("ref")
@_friendly
def info(ref: str) -> None:
    """Describe checkpoint REF: a shipped name, a folder, or hf://owner/name[@revision]."""
    opt = zoo.load(ref)
    c = opt.config
    recipe = c.get("recipe") or {}
    click.echo(f"name:            {opt.name}  ({opt.source or opt.path})")
    click.echo(f"source network:  {c.get('source_network')}")
    shared = " (one net shared by all)" if c.get("shared_net") is True else ""
    click.echo(f"layer kinds:     {', '.join(opt.nets)}{shared}")
    click.echo(f"features:        {c['features']['set']} {c['features']['names']}")
    click.echo(f"curvature mode:  {opt.curvature_mode or 'not used'}")
    click.echo(f"update net:      {c['update_net']}")
    training = c.get("training") or {}
    schedule = training.get("horizon_schedule") or []
    cycled = f" (task lengths {'/'.join(map(str, schedule))}, cycled)" if schedule else ""
    click.echo(f"horizon:         {training.get('horizon')} steps{cycled}")
    command = f"  ({c['command']})" if c.get("command") else ""
    click.echo(f"recipe:          {recipe.get('name', 'not recorded')}{command}")
    click.echo(f"metrics:         {json.dumps(c.get('metrics', {}))}")


# ---------------------------------------------------------------------- pull / publish


def _hub_ref(ctx, param, value: str) -> str:
    from zoo.errors import ConfigError
    from zoo.hub import HubRef

    try:
        HubRef.parse(value)
    except ConfigError as error:
        raise click.BadParameter(str(error)) from None
    return value


def _repo_id(ctx, param, value: str) -> str:
    if "@" in value:
        raise click.BadParameter(f"{value!r}: give owner/name without a revision (use --branch)")
    _hub_ref(ctx, param, f"hf://{value}")
    return value


@main.command()
@click.argument("ref", callback=_hub_ref)
@click.option(
    "--revision", default=None, help="Branch, tag or commit sha (instead of @REV in REF)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Fetch every file again, even if cached (repairs a damaged cache).",
)
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Download into this folder instead of the Hugging Face cache.",
)
@click.option(
    "--offline", is_flag=True, help="Use only the cache, no network call (as HF_HUB_OFFLINE=1)."
)
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Lock file (JSON): a branch found there is pulled at its locked commit, a new one is "
    "recorded.",
)
@click.option(
    "--update",
    is_flag=True,
    help="With --lock: move the pin to the commit the branch points at now.",
)
@_friendly
def pull(ref, revision, force, local_dir, offline, lock, update) -> None:
    """Download checkpoint REF (hf://owner/name[@revision]) pinned to one commit, and verify it."""
    from zoo import hub

    if update and lock is None:
        raise click.BadParameter("--update needs --lock FILE", param_hint="--update")
    if force and offline:
        raise click.BadParameter(
            "--force re-downloads, so it cannot be --offline", param_hint="--force"
        )
    if local_dir is not None:
        _writable_dir(local_dir)
    result = hub.pull(
        ref,
        revision=revision,
        force=force,
        local_dir=local_dir,
        offline=offline or None,
        lock=lock,
        update_lock=update,
    )
    where = "from the cache (offline)" if result.offline else f"commit {result.sha}"
    click.echo(f"pulled {result.ref} {where}: {result.optimizer.name}, loads strictly")
    click.echo(f"path:   {result.path}")
    click.echo(f"pin:    {result.pinned}")
    if result.locked:
        click.echo(f"locked: {lock} keeps {result.ref} at {result.sha}")
    if result.moved_from:
        click.echo(
            f"note: {result.ref.revision or 'main'} has moved on: {result.moved_from[:12]} -> "
            f"{result.remote_sha[:12]}"
            + (" (pass --update to move the lock)" if result.locked else ""),
            err=True,
        )


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--repo", required=True, callback=_repo_id, help="Hub repo owner/name (created if missing)."
)
@click.option("--private", is_flag=True, help="Create the repo private (only when it is created).")
@click.option(
    "--branch", default=None, help="Branch to commit to (created from main); default main."
)
@click.option(
    "--dry-run", is_flag=True, help="Validate and show what would be uploaded; upload nothing."
)
@click.option(
    "--message", default=None, help="Commit message (default: 'Publish NAME with zoo V')."
)
@_friendly
def publish(directory, repo, private, branch, dry_run, message) -> None:
    """Validate checkpoint folder DIRECTORY and upload it to the Hub in one commit."""
    from zoo import hub

    result = hub.publish(
        directory, repo, private=private, branch=branch, dry_run=dry_run, message=message
    )
    for name, size in result.files.items():
        click.echo(f"  {name:<18} {size:>10,} bytes")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.dry_run:
        user = f" as {result.user}" if result.user else ""
        click.echo(f"dry run: would publish to {repo}@{result.branch}{user}; nothing uploaded")
        return
    created = " (new repo)" if result.created_repo else ""
    click.echo(f"published {directory} to {repo}@{result.branch}{created}")
    click.echo(f"commit: {result.commit_url}")
    click.echo(f"sha:    {result.sha}")
    click.echo(f"pin:    {result.pinned}")


# ---------------------------------------------------------------------- meta-train


@main.command("meta-train")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint folder to write (replaced atomically if it exists).",
)
@_data_root_option
@click.option(
    "--iterations",
    type=int,
    default=None,
    callback=_positive,
    help="Override the recipe's meta.iterations (for quick trials).",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=0),
    default=25,
    show_default=True,
    help="Save the resumable meta-training state every K iterations (0: never).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the resumable state; default: OUT's sibling OUT.meta-state.",
)
@click.option(
    "--resume", is_flag=True, help="Continue from the state in --state-dir (same recipe)."
)
@_friendly
def meta_train_command(
    recipe: Path,
    out: Path,
    data_root: Path | None,
    iterations: int | None,
    save_every: int,
    state_dir: Path | None,
    resume: bool,
) -> None:
    """Meta-train an optimizer as RECIPE (TOML) says and save it to --out."""
    import dataclasses

    from zoo.checkpoint import save_checkpoint
    from zoo.data import load_dataset
    from zoo.meta import load_recipe, meta_train

    plan = load_recipe(recipe)
    if iterations is not None:
        plan = dataclasses.replace(plan, meta=dataclasses.replace(plan.meta, iterations=iterations))
    _writable_dir(out)
    state_dir = state_dir or out.with_name(out.name + ".meta-state")
    if save_every or resume:
        _writable_dir(state_dir, "--state-dir")
    data = load_dataset(plan.task.dataset, data_root)
    click.echo(f"data: {data.source}")
    command = _command_line("meta-train")
    with click.progressbar(
        length=plan.meta.iterations,
        label="meta-training",
        show_pos=True,
        item_show_func=lambda s: s,
    ) as bar:

        def progress(i, total, meta_loss):
            bar.update(1, f"meta-loss {meta_loss:.4f}")

        result = meta_train(
            plan,
            data,
            progress=progress,
            state_dir=state_dir if (save_every or resume) else None,
            save_every=save_every,
            resume=resume,
            command=command,
        )
    minutes = (result.total_seconds or result.seconds) / 60  # all sessions of a resumed run
    config = _checkpoint_config(plan, data, result, command, minutes)
    card = _model_card(plan, data, result, command, minutes, config)
    save_checkpoint(out, result.nets, zoo.FeatureSpec(plan.update_net.features), config, card)
    click.echo(
        f"best validation score {result.best_score:.4f} at iteration {result.best_iteration} "
        f"(untrained = Adam lr={plan.update_net.init_lr:g}: {result.validation[0][1]:.4f}); "
        f"{minutes:.1f} min"
    )
    click.echo(
        "validation by iteration: "
        + ", ".join(f"{it} {score:.4f}" for it, score in result.validation)
    )
    if result.best_iteration == 0:
        click.secho(
            f"WARNING: {_NEVER_BEAT.format(lr=plan.update_net.init_lr)}",
            err=True,
            fg="yellow",
            bold=True,
        )
    # A state is saved after each successful iteration that is a multiple of --save-every.
    saved = bool(save_every) and any(it % save_every == 0 for it, _ in result.history)
    click.echo(
        f"skipped non-finite meta-iterations: {result.skipped}"
        + (f"; resumable state in {state_dir}" if saved else "")
    )
    if result.skipped:
        click.secho(
            f"WARNING: {result.skipped} meta-iteration(s) went non-finite and were discarded "
            f"(their tasks redrawn); {len(result.history)} succeeded. Run with -v to see where; "
            "consider a lower meta.meta_lr or update_net.init_lr.",
            err=True,
            fg="yellow",
            bold=True,
        )
    click.echo(f"wrote {out}")


_NEVER_BEAT = (
    "the meta-trained nets never beat their untrained start on validation, so the checkpoint "
    "holds the untrained nets: it behaves exactly as Adam with lr {lr:g}. Try more "
    "meta.iterations (a run saved with --save-every continues with --resume), a lower "
    "meta.meta_lr or other tasks."
)


def _checkpoint_config(plan, data, result, command, minutes) -> dict:
    from zoo.meta import longest_horizon

    last = result.history[-20:]
    return {
        "name": plan.name,
        "description": plan.description,
        "source_network": {
            "name": plan.task.network,
            "dataset": plan.task.dataset,
            "input_shape": list(data.input_shape),
        },
        "curvature": {"mode": "diagonal"},
        "per_layer": plan.update_net.per_layer,
        "shared_net": plan.update_net.shared,
        "training": {
            "horizon": longest_horizon(plan.meta),
            "horizon_schedule": list(plan.meta.horizon_schedule),
            "unroll": plan.meta.unroll,
            "iterations": plan.meta.iterations,
            "best_iteration": result.best_iteration,
        },
        "recipe": plan.to_dict(),
        "data": {"source": data.source},
        "metrics": {
            "validation_score_untrained": round(result.validation[0][1], 5),
            "validation_score_best": round(result.best_score, 5),
            "final_meta_loss_mean_last_20": round(sum(v for _, v in last) / max(len(last), 1), 5),
            "meta_training_minutes": round(minutes, 2),  # summed over resumed sessions
            "skipped_meta_iterations": result.skipped,
        },
        "command": command,
        "commands": list(result.commands or (command,)),  # every session's, first to last
    }


def _model_card(plan, data, result, command, minutes, config) -> str:
    kinds = ", ".join(plan.update_net.kinds)
    if plan.update_net.shared:
        layout = f"one net shared by every layer kind ({kinds})"
    elif plan.update_net.per_layer:
        layers = ", ".join(result.nets)
        layout = f"one net per\nlayer of `{plan.task.network}`: {layers}"
    else:
        layout = f"one net per\nlayer kind: {kinds}"
    sessions = config.get("commands") or [command]
    commands = f"`{sessions[0]}`" + "".join(f", resumed with `{c}`" for c in sessions[1:])
    validation = "\n".join(f"| {it} | {score:.4f} |" for it, score in result.validation)
    tasks = ", ".join(
        f"{v.network} ({v.steps} steps, seeds {list(v.seeds)})" for v in plan.validation
    )
    never_beat = (
        "\n\n**Note:** " + _NEVER_BEAT.format(lr=plan.update_net.init_lr)
        if result.best_iteration == 0
        else ""
    )
    schedule = plan.meta.horizon_schedule
    tasks_text = "/".join(map(str, schedule)) + " (cycled)" if schedule else str(plan.meta.horizon)
    return f"""---
library_name: zoo
tags:
- learned-optimizer
- zoo
- pytorch
{chr(10).join(f"- layer-kind-{k}" for k in plan.update_net.kinds)}
datasets:
- {plan.task.dataset}
---

# {plan.name}

{plan.description}

A coordinate-wise LSTM optimizer ({plan.update_net.num_layers} layer(s) x \
{plan.update_net.hidden_size} units, {layout}) with feature set \
`{plan.update_net.features}`, meta-trained with zoo
{zoo.__version__} on the `{plan.task.network}` network and {plan.task.dataset}.

## How it was made

- command: {commands}
- data: {data.source}
- meta-training: {plan.meta.iterations} meta-iterations of {plan.meta.unroll}-step unrolls,
  tasks of {tasks_text} steps, meta-loss `{plan.meta.meta_loss}`, Adam meta-optimizer
  lr {plan.meta.meta_lr:g}, meta-gradient clip {plan.meta.clip:g}
- time: {minutes:.1f} minutes on the machine that ran the command(s), all sessions
- final meta-loss (mean of the last 20 iterations):
  {config["metrics"]["final_meta_loss_mean_last_20"]}

## Validation

Score = mean log training loss over the run (lower is better) on: {tasks}.
Iteration 0 is the untrained net, which is exactly Adam with lr {plan.update_net.init_lr:g}.
The weights shipped are those of the best iteration ({result.best_iteration}).{never_beat}

| iteration | score |
|---|---|
{validation}

## Use

```python
import zoo
opt = zoo.load("{plan.name}").attach(model)
loss = zoo.curvature.backward(model, inputs, target)   # gradient + second derivatives
opt.step()
```
"""


# ---------------------------------------------------------------------- transfer


def _attach(pretrained, model, *, options):
    """``pretrained.attach(model)`` evaluated with the scale ``options``."""
    optimizer = pretrained.attach(model)
    optimizer.configure(options)
    return optimizer


@main.command()
@click.option(
    "--src",
    default="small",
    show_default=True,
    help="Optimizer to transfer: 'small' (the shipped one meta-trained on small), a shipped "
    "name or a checkpoint folder.",
)
@click.option(
    "--dst",
    default="big",
    show_default=True,
    help="Network to train: small, big, a torchvision model (resnet18, resnet50, vgg11, ...; "
    "untrained) or a factory package.module:function.",
)
@click.option(
    "--dataset",
    type=click.Choice(["mnist", "cifar10", "imagenet"]),
    default="mnist",
    show_default=True,
    help="Dataset to train on.",
)
@_data_root_option
@click.option(
    "--steps",
    type=int,
    default=500,
    show_default=True,
    callback=_positive,
    help="Training steps per run.",
)
@click.option(
    "--seeds",
    type=int,
    default=3,
    show_default=True,
    callback=_positive,
    help="Number of reported seeds (20000..20000+N-1, disjoint from meta-training, "
    "checkpoint selection and tuning); every method gets the same inits and batches per seed.",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    callback=_positive,
    help="Minibatch size (default: 128; 32 for imagenet).",
)
@click.option(
    "--adam-grid",
    default=DEFAULT_ADAM_GRID,
    show_default=True,
    callback=_grid,
    help="Adam learning rates to tune over (on a separate tuning seed).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to train: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Forward/backward precision (autocast); fp16 adds dynamic loss scaling. "
    "Optimizers always run in fp32.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=min(4, os.cpu_count() or 1),
    show_default="min(4, CPU count)",
    help="DataLoader worker processes for imagenet (0: load in the main process).",
)
@click.option(
    "--chunk-size",
    default="auto",
    show_default=True,
    callback=_chunk_size,
    help="Coordinates per chunk of the fused update-net evaluation; 'auto': the one-shot "
    "path up to 1M parameters, 2048 above; 'off': always one-shot.",
)
@click.option(
    "--lstm-state",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="Storage type of the update nets' per-coordinate LSTM state (bf16 halves it).",
)
@click.option(
    "--hessian-every",
    type=int,
    default=1,
    show_default=True,
    callback=_positive,
    help="Recompute the second derivative every k steps (reused in between).",
)
@click.option(
    "--eval-examples",
    type=int,
    default=2048,
    show_default=True,
    callback=_positive,
    help="Training examples the reported training loss is measured on.",
)
@click.option(
    "--test-examples",
    type=int,
    default=None,
    callback=_positive,
    help="Test examples for the accuracy (default: the whole test split).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/transfer"),
    show_default=True,
    help="Folder for the PNG plot and results JSON.",
)
@_friendly
def transfer(
    src,
    dst,
    dataset,
    data_root,
    steps,
    seeds,
    batch_size,
    adam_grid,
    device,
    precision,
    workers,
    chunk_size,
    lstm_state,
    hessian_every,
    eval_examples,
    test_examples,
    out,
) -> None:
    """Attach a learned optimizer per layer kind to --dst, train it, and compare with Adam."""
    import torch

    from zoo import layer_kinds
    from zoo.data import load_dataset
    from zoo.fast_update import DEFAULT_CHUNK, UpdateOptions
    from zoo.networks import build_network, count_parameters, get_network
    from zoo.train import (
        Method,
        adam,
        compare,
        markdown_table,
        plot_curves,
        report_seeds,
        resolve_device,
        steps_to_reach,
        summarise,
        tune_lr,
    )

    pretrained = zoo.load(src)
    get_network(dst)
    _writable_dir(out)
    device = resolve_device(device)
    data = load_dataset(dataset, data_root)
    if dataset == "imagenet":
        data.workers = workers
    batch_size = batch_size or (32 if dataset == "imagenet" else 128)
    probe = build_network(dst, data.input_shape, data.num_classes)
    if chunk_size == "auto":
        chunk = DEFAULT_CHUNK if count_parameters(probe) > 1_000_000 else None
    elif chunk_size == "off":
        chunk = None
    elif chunk_size.isdigit() and int(chunk_size) > 0:
        chunk = int(chunk_size)
    else:  # _chunk_size has checked it already
        raise click.BadParameter(
            f"expected auto, off or a positive integer, got {chunk_size!r}",
            param_hint="'--chunk-size'",
        )
    update_options = UpdateOptions(
        chunk_size=chunk,
        state_dtype=torch.bfloat16 if lstm_state == "bf16" else torch.float32,
        hessian_every=hessian_every,
    )
    source = pretrained.config.get("source_network", {})
    click.echo(f"data: {data.source}")
    click.echo(
        f"optimizer: {pretrained.name} "
        f"(meta-trained on {source.get('name')}/{source.get('dataset')}, "
        f"features {pretrained.features.name}) -> {dst} ({count_parameters(probe):,} parameters)"
    )
    # The report needs only the routing, not an optimizer's per-coordinate state (GBs here).
    assignments = (
        pretrained.attach(probe).assignments
        if pretrained.per_layer
        else layer_kinds.assign(probe, tuple(pretrained.nets), "adam")
    )
    click.echo(layer_kinds.report(assignments))
    kinds = {}
    for a in assignments:
        tensors, coords = kinds.get(a.kind, (0, 0))
        kinds[a.kind] = (tensors + 1, coords + a.param.numel())
    click.echo(
        "per layer kind: "
        + ", ".join(f"{k}: {t} tensors / {c:,} coords" for k, (t, c) in sorted(kinds.items()))
    )
    click.echo(
        f"device {device}, precision {precision}, update: "
        f"{'chunks of ' + str(chunk) if chunk else 'one-shot'}, LSTM state {lstm_state}, "
        f"second derivative every {hessian_every} step(s)"
    )
    learned = Method(
        f"zoo {pretrained.name}",
        functools.partial(_attach, pretrained, options=update_options),
        needs_curvature=pretrained.features.uses_curvature,
    )
    total = steps * len(adam_grid) + steps * seeds * 2
    with click.progressbar(length=total, label="training") as bar:
        options = dict(
            batch_size=batch_size,
            eval_examples=eval_examples,
            test_examples=test_examples,
            progress=bar.update,
            device=device,
            precision=precision,
        )
        best_lr, scores = tune_lr(
            dst, data, adam, adam_grid, steps=steps, seed=TUNING_SEED, **options
        )
        methods = [learned, adam(best_lr)]
        results = compare(dst, data, methods, steps=steps, seeds=report_seeds(seeds), **options)
    grid_text = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in scores.items())
    click.echo(
        f"Adam grid (final training loss on tuning seed {TUNING_SEED}): {grid_text}; "
        f"best {best_lr:g}"
    )
    report_steps = [s for s in (50, 100, 200, 500, 1000, 2000, 5000) if s < steps] + [steps]
    header, rows = summarise(results, report_steps)
    adam_name = adam(best_lr).name
    adam_final = sum(r.train_loss[-1] for r in results[adam_name]) / seeds
    mean_curve = [
        sum(v) / seeds for v in zip(*(r.train_loss for r in results[learned.name]), strict=True)
    ]
    reach = steps_to_reach(results[learned.name][0].steps, mean_curve, adam_final)
    table = markdown_table(header, rows)
    shown = report_seeds(seeds)
    click.echo(
        f"\n{dst} on {dataset}, {steps} steps, mean ± sd over {seeds} seed(s) "
        f"({shown[0]}-{shown[-1]}; Adam tuned on {TUNING_SEED}):\n"
    )
    click.echo(table)
    skipped = sum(r.skipped_steps for r in results[learned.name])
    click.echo(f"\nskipped non-finite steps (zoo optimizer, all seeds): {skipped}")
    click.echo(
        f"\nsteps for zoo to reach Adam's final loss ({adam_final:.4f}): "
        + (f"{reach} ({reach / steps:.2f}x Adam's {steps})" if reach else f"not reached in {steps}")
    )
    png = out / f"transfer-{dst}-{dataset}.png"
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(results, png, f"{pretrained.name} -> {dst} ({dataset})")
    except OSError as error:
        from zoo.safe_io import describe_os_error

        raise click.ClickException(f"cannot write {png}: {describe_os_error(error)}") from error
    payload = {
        "src": str(src),
        "dst": dst,
        "dataset": dataset,
        "data": data.source,
        "steps": steps,
        "seeds": seeds,
        "adam_grid": scores,
        "adam_best_lr": best_lr,
        "table": table,
        "runs": {name: [r.__dict__ for r in records] for name, records in results.items()},
    }
    from zoo.safe_io import atomic_write_text

    atomic_write_text(  # temp name + fsync + rename: a killed run leaves no torn JSON
        out / f"transfer-{dst}-{dataset}.json", json.dumps(payload, indent=2, default=str)
    )
    click.echo(f"plot: {png}")


# ---------------------------------------------------------------------- bench


def _names(choices):
    def parse(ctx, param, value: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise click.BadParameter(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def _grid_option(method: str, default: tuple[float, ...]):
    return click.option(
        f"--{method}-grid",
        f"{method}_grid",
        default=",".join(f"{v:g}" for v in default),
        show_default=True,
        callback=_grid,
        help=f"{method} learning rates to tune over on the tuning seed"
        + (" (SOU: the step size α)." if method == "sou" else "."),
    )


@main.command()
@click.option(
    "--datasets",
    default="mnist,cifar10",
    show_default=True,
    callback=_names(("mnist", "cifar10")),
    help="Comma-separated datasets.",
)
@click.option(
    "--networks",
    default="small,big",
    show_default=True,
    callback=_names(("small", "big")),
    help="Comma-separated networks; learned optimizers reach `big` by transfer from `small`.",
)
@click.option(
    "--methods",
    default=",".join(("sgd", "rmsprop", "adam", "sou", "lstm-g", "lstm-gh", "lstm-layer", "joint")),
    show_default=True,
    callback=_names(("sgd", "rmsprop", "adam", "sou", "lstm-g", "lstm-gh", "lstm-layer", "joint")),
    help="Comma-separated methods (see `zoo.bench`); `joint` is joint mode.",
)
@click.option(
    "--seeds",
    type=int,
    default=5,
    show_default=True,
    callback=_positive,
    help="Number of reported seeds (20000..20000+N-1, disjoint from meta-training, "
    "checkpoint selection and tuning).",
)
@click.option(
    "--steps", type=int, default=500, show_default=True, callback=_positive, help="Steps per run."
)
@click.option(
    "--tune-steps",
    type=int,
    default=None,
    callback=_positive,
    help="Steps per grid point (default: --steps).",
)
@click.option(
    "--batch-size",
    type=int,
    default=128,
    show_default=True,
    callback=_positive,
    help="Minibatch size.",
)
@_grid_option("sgd", (0.01, 0.03, 0.1, 0.3))
@_grid_option("rmsprop", (3e-4, 1e-3, 3e-3, 1e-2))
@_grid_option("adam", (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2))
@_grid_option("sou", (0.003, 0.01, 0.03, 0.1))
@click.option(
    "--sou-dampings",
    default="0.03,0.3",
    show_default=True,
    callback=_grid,
    help="SOU damping values μ, tuned jointly with its step size α.",
)
@click.option(
    "--lstm-g",
    "lstm_g",
    default="lstm2-g-{dataset}-small",
    show_default=True,
    help="Gradient-only LSTM checkpoint ({dataset}, {network} are filled in).",
)
@click.option(
    "--lstm-gh",
    "lstm_gh",
    default="lstm2-gh-{dataset}-small",
    show_default=True,
    help="Second-order LSTM checkpoint.",
)
@click.option(
    "--lstm-layer",
    "lstm_layer",
    default="lstm2-gh-{dataset}-{network}-per-layer",
    show_default=True,
    help="Per-layer second-order checkpoint, meta-trained on the cell's network.",
)
@click.option(
    "--joint-unroll",
    type=int,
    default=20,
    show_default=True,
    callback=_positive,
    help="Joint mode: steps per meta-update.",
)
@click.option(
    "--joint-meta-lr",
    type=float,
    default=1e-3,
    show_default=True,
    help="Joint mode: meta-optimizer (Adam) learning rate.",
)
@click.option(
    "--target-loss",
    type=float,
    default=None,
    help="Loss for 'steps to target' (default: tuned Adam's final loss).",
)
@click.option(
    "--budget",
    "budget_seconds",
    type=float,
    default=None,
    help="Wall-clock budget in seconds for 'accuracy within budget' (default: the fastest "
    "method's run time).",
)
@click.option(
    "--eval-examples",
    type=int,
    default=2048,
    show_default=True,
    callback=_positive,
    help="Training examples the training loss is measured on.",
)
@click.option(
    "--test-examples",
    type=int,
    default=2000,
    show_default=True,
    callback=_positive,
    help="Test examples for accuracy.",
)
@click.option(
    "--train-examples",
    type=int,
    default=None,
    callback=_positive,
    help="Train on the first N training examples only (quick runs).",
)
@click.option(
    "--sensitivity/--no-sensitivity",
    default=True,
    show_default=True,
    help="Run the hyper-parameter sensitivity sweep.",
)
@click.option(
    "--sensitivity-steps",
    type=int,
    default=None,
    callback=_positive,
    help="Steps per sensitivity run (default: --steps).",
)
@click.option(
    "--long-factor",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Longer-than-trained runs: this many meta-training horizons (0: skip).",
)
@click.option(
    "--long-max-steps",
    type=int,
    default=None,
    callback=_positive,
    help="Cap on the longer-than-trained runs' steps.",
)
@_data_root_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench"),
    show_default=True,
    help="Folder for report.md, PNGs and bench.json.",
)
@_friendly
def bench(**options) -> None:
    """The paper's comparison: SGD, RMSprop, Adam, SOU, the gradient-only and second-order
    LSTMs and joint mode on each dataset and network, with sensitivity and long-run studies."""
    from zoo.bench import plan_bench, run_bench, write_report

    out = _writable_dir(options.pop("out"))
    config = _bench_config(options)
    plan = plan_bench(config)
    for name, data in plan.data.items():
        click.echo(f"data ({name}): {data.source}")
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    with click.progressbar(length=plan.total_steps, label="bench", show_pos=True) as bar:
        cells = run_bench(plan, progress=bar.update)
    command = _command_line("bench")
    try:
        text = write_report(cells, config, out, command)
    except OSError as error:
        from zoo.safe_io import describe_os_error

        raise click.ClickException(f"cannot write {out}: {describe_os_error(error)}") from error
    click.echo("\n" + text)
    click.echo(f"\nreport: {out / 'report.md'}")


def _bench_config(options: dict):
    """A :class:`zoo.bench.BenchConfig` from ``zoo bench``'s parsed options (less ``out``)."""
    from zoo.bench import DEFAULT_GRIDS, BenchConfig

    options = dict(options)
    grids = {m: tuple(options.pop(f"{m}_grid")) for m in DEFAULT_GRIDS}
    options["sou_dampings"] = tuple(options["sou_dampings"])
    checkpoints = {
        "lstm-g": options.pop("lstm_g"),
        "lstm-gh": options.pop("lstm_gh"),
        "lstm-layer": options.pop("lstm_layer"),
    }
    data_root = options.pop("data_root")
    return BenchConfig(
        grids=grids,
        checkpoints=checkpoints,
        data_root=str(data_root) if data_root else None,
        **options,
    )


def _bench_config_from_command(command: str):
    """The configuration a recorded ``zoo bench ...`` command ran with, for bench.json files
    written before they recorded it (defaults are this zoo's)."""
    from zoo.errors import ConfigError

    try:
        args = shlex.split(command)
    except ValueError as error:
        raise ConfigError(f"recorded command {command!r} does not parse ({error})") from error
    if "bench" not in args:
        raise ConfigError(f"recorded command {command!r} is not a `zoo bench` command")
    if set(args) & set(main.context_settings["help_option_names"]):
        # Parsing would print the help and exit instead of returning the options.
        raise ConfigError(f"recorded command {command!r} only asks for help; rerun that benchmark")
    try:
        ctx = bench.make_context("bench", args[args.index("bench") + 1 :])
    except click.ClickException as error:
        raise ConfigError(
            f"recorded command {command!r} does not parse as a bench run "
            f"({error.format_message()}); rerun that benchmark"
        ) from error
    options = dict(ctx.params)
    options.pop("out", None)
    return _bench_config(options)


@main.command("bench-merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the merged report.md, PNGs and bench.json.",
)
@_friendly
def bench_merge(sources: tuple[Path, ...], out: Path) -> None:
    """Merge the output folders of several `zoo bench` runs (same seeds, steps and batches)
    into one report: one table and one set of plots per dataset and network."""
    from zoo.bench import write_report
    from zoo.bench_merge import load_report, merge_reports

    runs = [load_report(path, _bench_config_from_command) for path in sources]
    if any(run.path.resolve() == out.resolve() for run in runs):
        raise click.ClickException(f"--out {out} is one of the sources; write the merge elsewhere")
    config, cells = merge_reports(runs)
    out = _writable_dir(out)
    command = _command_line("bench-merge")
    from zoo.safe_io import describe_os_error, replace_dir, staging_dir

    # Rendered into a staging folder and swapped in whole: a failure leaves no half report.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(out)
        try:
            text = write_report(
                cells, config, staging, command, sources=[s for r in runs for s in r.sources]
            )
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as error:
        raise click.ClickException(f"cannot write {out}: {describe_os_error(error)}") from error
    click.echo(text)
    click.echo(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
