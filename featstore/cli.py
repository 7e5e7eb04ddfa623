"""The ``featstore`` command line.

    featstore build   [--model M] [--layers L,...] [--dataset D] [--splits S,...] ...
    featstore ls      [--store PATH] [--json] [--all]
    featstore info    GROUP [--store PATH]
    featstore verify  [GROUP ...] [--store PATH]
    featstore rm      [GROUP ...] [--incomplete] [--dry-run] [--store PATH]
    featstore layers  MODEL
    featstore datasets
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading

from . import _build, datasets, models, params
from ._store import DEFAULT_STORE, FeatureStore
from .errors import FeatstoreError, GroupNotFoundError
from .remote import parse_storage_options, push

__all__ = ["main"]


def _human(nbytes) -> str:
    if nbytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return "?"


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="run a backbone once and cache its features as Zarr",
                       description="Run a backbone (timm, open_clip, Hugging Face, torchvision) once per split and "
                       "write one Zarr feature group per (layer, split); on many workers with --jobs / --launcher; "
                       "a study's builds from a file with --spec. Resumable: re-run the same command after an "
                       "interruption.")
    p.add_argument("--spec", metavar="FILE", default=None,
                   help="a build spec (TOML, [[builds]] tables of these options): every build in it, one pass per "
                        "(build, split); the options given here override the file's")
    params.add_arguments(p, _build.BuildOptions)


def _cmd_build(a) -> int:
    options = params.parse_arguments(_build.BuildOptions, a)
    # checked here too, so that a message names the flag the user typed (--limit, not limit)
    params.validate(_build.BuildOptions, options, key_format=params.cli_key(params.flags(_build.BuildOptions)))
    if a.spec is not None:
        from ._buildspec import run_build_spec, summary

        text, ok = summary(run_build_spec(a.spec, overrides=options))
        print(text)
        return 0 if ok else 1
    groups = _build.build(**options)
    store = options.get("store", _build.BuildOptions.model_fields["store"].default)
    now = [g for g in groups if getattr(g, "built_now", True)]  # the others were already complete
    print(f"Built {len(now)} group(s) in {store}" + (f"; {len(groups) - len(now)} already complete" if
                                                     len(now) < len(groups) else "") + ":")
    for g in groups:
        t = g.timings
        rate = f", {t['images_per_second']:.1f} img/s" if g in now and t.get("images_per_second") else \
            ("" if g in now else ", already complete")
        print(f"  {g.name}  {g.n_samples} x {g.n_neurons} {g.spec.dtype}"
              f"{f' + {g.n_views} views' if g.n_views else ''}{rate}")
    return 0


def _cmd_ls(a) -> int:
    fs = FeatureStore(a.store, mode="r", storage_options=parse_storage_options(a.storage_option))
    rows = [g.summary() for g in fs.groups(include_incomplete=a.all)]
    broken = fs.unreadable  # groups that cannot be opened: named, never hiding the others
    if a.json:
        print(json.dumps(rows + [{"name": n, "state": "unreadable", "problem": why} for n, why in broken.items()],
                         indent=2))
        return 0
    if not rows and not broken:
        print(f"{a.store}: no {'groups' if a.all else 'complete groups'}")
        return 0
    header = ("GROUP", "SHAPE", "DTYPE", "LIMIT", "VIEWS", "SIZE", "STATE")
    table = [header] + [
        (r["name"], f"{r['n_samples']}x{r['n_neurons']}", r["dtype"],
         f"{r['per_class']}/class" if r.get("per_class") else str(r["limit"] or "all"), str(r["views"]),
         _human(r["bytes_on_disk"]), r["state"]) for r in rows
    ] + [(name, "?", "?", "?", "?", "?", "unreadable") for name in broken]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for name, why in broken.items():
        print(f"unreadable: {why} (remove it with `featstore rm {name}`)", file=sys.stderr)
    return 0


def _cmd_info(a) -> int:
    fs = FeatureStore(a.store, mode="r", storage_options=parse_storage_options(a.storage_option))
    names = fs.group_names()
    if a.group not in names:
        raise GroupNotFoundError(name=a.group, store=a.store, known=names)
    g = fs._open_group(a.group)  # an unreadable one: its error, naming it
    info = {"name": g.name, "state": g.state, "n_samples": g.n_samples, "n_neurons": g.n_neurons,
            "classes": g.classes, "spec": g.spec.to_dict(), "key": g.spec.key(),
            "provenance": g.provenance, "timings": g.timings, "bytes_on_disk": g.nbytes_on_disk(),
            "skipped": g.skipped}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_verify(a) -> int:
    fs = FeatureStore(a.store, mode="r", storage_options=parse_storage_options(a.storage_option))
    groups = fs.groups(include_incomplete=True)
    broken = dict(fs.unreadable)
    if a.groups:
        unknown = set(a.groups) - {g.name for g in groups} - set(broken)
        if unknown:
            raise GroupNotFoundError(name=sorted(unknown)[0], store=a.store, known=[g.name for g in groups])
        groups = [g for g in groups if g.name in a.groups]
        broken = {n: why for n, why in broken.items() if n in a.groups}
    bad = len(broken)
    for name, why in broken.items():
        print(f"FAIL {name}\n  - {why}")
    for g in groups:
        problems = g.verify()
        if problems:
            bad += 1
            print(f"FAIL {g.name}")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"ok   {g.name}")
    total = len(groups) + len(broken)
    print(f"{total - bad} of {total} group(s) verified")
    return 1 if bad else 0


def _cmd_rm(a) -> int:
    FeatureStore(a.store, mode="r")  # exists and is a featstore store; nothing is created
    fs = FeatureStore(a.store, mode="a")
    removed = fs.remove(a.groups, incomplete=a.incomplete, dry_run=a.dry_run)
    for name, size in removed:
        print(f"{'would remove' if a.dry_run else 'removed'} {name} ({_human(size)})")
    total = _human(sum(size for _, size in removed))
    if not removed:
        print("nothing to remove")
    elif a.dry_run:
        print(f"{len(removed)} group(s) would be removed, {total}; nothing was deleted (--dry-run)")
    else:
        print(f"{len(removed)} group(s) removed, {total} freed")
    return 0


def _cmd_push(a) -> int:
    done = push(a.store, a.url, a.groups, storage_options=parse_storage_options(a.storage_option),
                progress=not a.no_progress)
    for name, what in done:
        print(f"{what:13s} {name}")
    restored = sum(w.startswith("restored") for _, w in done)
    print(f"{sum(w == 'pushed' for _, w in done)} group(s) pushed to {a.url}"
          + (f", {restored} restored" if restored else ""))
    return 0


def _cmd_layers(a) -> int:
    import contextlib
    import io

    print(f"featstore layers: building {a.model} with random weights to list its layers ...", file=sys.stderr)
    from ._sources import parse_model_name

    source = models._source(parse_model_name(a.model))
    weights = "random" if "random" in source.weights else None
    with contextlib.redirect_stderr(io.StringIO()):
        model, _ = models.create_backbone(a.model, weights)
    rows = models.describe_layers(model, a.model)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'LAYER'.ljust(width)}  {'OUTPUT (one image)':22s}  D")
    for name, shape, d in rows:
        print(f"{name.ljust(width)}  {('x'.join(map(str, shape)) if shape else '(not run)'):22s}  {d if d else ''}".rstrip())
    return 0


def _cmd_datasets(a) -> int:
    from ._datasources import dataset_sources

    datasets.load_plugins()
    print("Registered datasets (--dataset NAME):")
    for name in sorted(datasets.DATASETS):
        e = datasets.DATASETS[name]
        print(f"  {name:16s} splits: {','.join(e.splits):16s} {e.description}")
    print("Sources (--dataset SOURCE:WHERE):")
    for s in dataset_sources().values():
        takes = ", ".join("--" + o.replace("_", "-") for o in s.options)
        extra = f" [needs the {s.extra} extra]" if s.extra else ""
        print(f"  {s.example:16s} {s.description}{extra}" + (f"; options: {takes}" if takes else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="featstore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    p = sub.add_parser("ls", help="list the groups of a store",
                       description="List a store's groups: name, shape, dtype, limit, views, size on disk and "
                                   "state. Groups that cannot be opened are named, with why.")
    p.add_argument("--store", default=DEFAULT_STORE)
    _add_storage_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include incomplete (building) groups")
    p = sub.add_parser("info", help="show a group's full extraction spec and provenance",
                       description="Print one group's extraction spec, its key, provenance (library versions, "
                                   "weights and their sha256, device, host), timings and skipped files as JSON.")
    p.add_argument("group")
    p.add_argument("--store", default=DEFAULT_STORE)
    _add_storage_option(p)
    p = sub.add_parser("verify", help="check every chunk is present and readable, no NaN/Inf, labels in range",
                       description="Read every chunk of every pass of the groups and check it: present, "
                                   "decodable, finite, holding what its build wrote (its CRC-32); labels in "
                                   "range. Exit 1 when anything is wrong, naming it.")
    p.add_argument("groups", nargs="*", help="groups to check (default: all)")
    p.add_argument("--store", default=DEFAULT_STORE)
    _add_storage_option(p)
    p = sub.add_parser("push", help="copy complete groups to object storage (s3://...); resumable",
                       description="Copy complete groups of a local store to an fsspec URL. A group becomes "
                       "visible there only when it is whole (its metadata is uploaded last); re-run an "
                       "interrupted push to resume it. Credentials come from the usual environment "
                       "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) or --storage-option.")
    p.add_argument("store", help="the local store")
    p.add_argument("url", help="where to copy it, e.g. s3://bucket/featstore.zarr (the bucket must exist)")
    p.add_argument("groups", nargs="*", help="group names (default: every complete group)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_storage_option(p)
    p = sub.add_parser("rm", help="delete groups (named, or every incomplete one); never one being built",
                       description="Delete feature groups. Every name is checked and every group's build lock "
                       "taken before anything is deleted, so an unknown name or a group being built changes nothing.")
    p.add_argument("groups", nargs="*", help="group names (see `featstore ls --all`)")
    p.add_argument("--incomplete", action="store_true",
                   help="also every incomplete group (killed builds) and leftover temporary folders")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; delete nothing")
    p.add_argument("--store", default=DEFAULT_STORE)
    p = sub.add_parser("layers", help="list a model's layers with their output shapes and widths",
                       description="List the names --layers takes for a model of any source (timm, open_clip:, hf:, "
                                   "torchvision:): pre_logits, every module and graph node, in the model's order, each "
                                   "with its output shape on one image and its width d under the default pooling. "
                                   "Builds the model with random weights (nothing is downloaded for timm, open_clip "
                                   "and torchvision; hf: needs the model's config, a local folder or the hub).")
    p.add_argument("model")
    sub.add_parser("datasets", help="list the registered datasets",
                   description="List the datasets --dataset takes, with their splits and where their files come "
                               "from, and the imagefolder:PATH form.")
    commands = dict(COMMANDS)
    for register in _extensions():
        register(sub, commands)
    parser.set_defaults(_commands=commands)
    return parser


def _add_storage_option(p) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec option for a URL store, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable; "
                        "values stay text)")


COMMANDS = {"build": _cmd_build, "ls": _cmd_ls, "info": _cmd_info, "verify": _cmd_verify, "rm": _cmd_rm,
            "push": _cmd_push,
            "layers": _cmd_layers, "datasets": _cmd_datasets}
ENTRY_POINT_GROUP = "featstore.commands"


def _extensions():
    """Sub-commands other packages register under the ``featstore.commands`` entry-point
    group (``pipelines`` adds sweep and report): each entry is ``register(subparsers,
    commands)``. featstore never imports them by name, so the store does not depend on
    what orchestrates it."""
    from importlib.metadata import entry_points

    # one registration per target: the same distribution seen twice (an egg-info beside an
    # editable install, a stale build) must not register its commands twice
    unique = {ep.value: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for ep in sorted(unique.values(), key=lambda e: e.name):
        yield ep.load()


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: everything the command started (a sweep's workers,
    a build's loader processes) is stopped through the same cleanup, and it says how to resume."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


def main(argv=None) -> int:
    import signal

    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, file=None, line=None):
        """A warning as one line of the command's own (no source line; above a progress bar)."""
        text = f"featstore {args.command}: warning: {message}"
        try:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 - a warning must never fail the command
            print(text, file=sys.stderr)

    warnings.showwarning = one_line
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)
    try:
        return args._commands[args.command](args)
    except FeatstoreError as e:
        print(f"featstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"featstore {args.command}: {how}; re-run the same command to resume", file=sys.stderr)
        return 128 + int(signum)
    except BrokenPipeError:  # `featstore info | head`: the reader left; nothing to say to it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print(f"featstore {args.command}: error: out of memory; a smaller --batch-size, --limit or (sweeps) "
              f"max_memory_mb would help", file=sys.stderr)
        return 1
    except OSError as e:  # a write or read the command did not expect to fail: one line, the path and why
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"featstore {args.command}: error:{where} {e.strerror or e} ({type(e).__name__}); free space or fix "
              f"the permissions, then re-run the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
