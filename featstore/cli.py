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
import json
import sys

from . import _build, _datasets, _models
from ._store import DEFAULT_STORE, FeatureStore
from .errors import FeatstoreError

__all__ = ["main"]


def _human(nbytes) -> str:
    if nbytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return "?"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer (got {value})")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="run a backbone once and cache its features as Zarr",
                       description="Run a timm backbone once per (layer, split) and write Zarr feature groups. "
                       "Resumable: re-run the same command after an interruption.")
    p.add_argument("--model", default=_models.EMBEDDED_MODEL, help="timm architecture (default: %(default)s)")
    p.add_argument("--weights", default=None, choices=sorted(_models.WEIGHT_SOURCES),
                   help="weight source (default: embedded for tf_efficientnet_lite0, else hub)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for --weights checkpoint")
    p.add_argument("--map", dest="mapping", default="names", choices=("names", "positional"),
                   help="how checkpoint tensors map onto the model (default: %(default)s)")
    p.add_argument("--layers", default="pre_logits",
                   help="comma-separated layers, all from one pass (default: %(default)s; see `featstore layers MODEL`)")
    p.add_argument("--pooling", default="avg", choices=_models.POOLINGS,
                   help="pooling of spatial maps / tokens for module layers (default: %(default)s)")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name or imagefolder:PATH (default: %(default)s)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits (default: %(default)s)")
    p.add_argument("--root", default=None, help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--limit", type=_positive_int, default=None, help="stratified, seeded subset of N images per split")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of --limit and --views (default: 0)")
    p.add_argument("--views", type=_nonneg_int, default=0, help="extra augmented passes over train (default: 0)")
    p.add_argument("--dtype", default="float16", choices=_build.DTYPES, help="storage dtype (default: %(default)s)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store path or URL (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="forward batch size (default: 16 on CPU, 256 on CUDA)")
    p.add_argument("--workers", type=_nonneg_int, default=None,
                   help="DataLoader worker processes (default: min(4, cores - 1))")
    p.add_argument("--device", default="auto", choices=_build.DEVICES, help="(default: auto = cuda if present)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="override the model's input size")
    p.add_argument("--chunk-rows", type=_positive_int, default=None, help="rows per chunk (default: ~8 MB)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="exit instead of waiting when another build holds a group")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _cmd_build(a) -> int:
    import os

    workers = a.workers if a.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    groups = _build.build(
        a.model, weights=a.weights, checkpoint=a.checkpoint, mapping=a.mapping, layers=a.layers,
        pooling=a.pooling, dataset=a.dataset, splits=a.splits, root=a.root, download=a.download,
        limit=a.limit, seed=a.seed, views=a.views, dtype=a.dtype, store=a.store, batch_size=a.batch_size,
        workers=workers, device=a.device, image_size=a.image_size, chunk_rows=a.chunk_rows,
        progress=a.progress, wait=a.wait,
    )
    print(f"Built {len(groups)} group(s) in {a.store}:")
    for g in groups:
        t = g.timings
        rate = f", {t['images_per_second']:.1f} img/s" if t.get("images_per_second") else ""
        print(f"  {g.name}  {g.n_samples} x {g.n_neurons} {g.spec.dtype}"
              f"{f' + {g.n_views} views' if g.n_views else ''}{rate}")
    return 0


def _cmd_ls(a) -> int:
    fs = FeatureStore(a.store, mode="r")
    rows = [g.summary() for g in fs.groups(include_incomplete=a.all)]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{a.store}: no {'groups' if a.all else 'complete groups'}")
        return 0
    header = ("GROUP", "SHAPE", "DTYPE", "VIEWS", "SIZE", "STATE")
    table = [header] + [
        (r["name"], f"{r['n_samples']}x{r['n_neurons']}", r["dtype"], str(r["views"]),
         _human(r["bytes_on_disk"]), r["state"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _cmd_info(a) -> int:
    fs = FeatureStore(a.store, mode="r")
    names = fs.group_names()
    if a.group not in names:
        from .errors import GroupNotFoundError

        raise GroupNotFoundError(f"No group {a.group!r} in {a.store}; groups: {', '.join(names) or '(none)'}")
    g = [x for x in fs.groups(include_incomplete=True) if x.name == a.group][0]
    info = {"name": g.name, "state": g.state, "n_samples": g.n_samples, "n_neurons": g.n_neurons,
            "classes": g.classes, "spec": g.spec.to_dict(), "key": g.spec.key(),
            "provenance": g.provenance, "timings": g.timings, "bytes_on_disk": g.nbytes_on_disk()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_verify(a) -> int:
    fs = FeatureStore(a.store, mode="r")
    groups = fs.groups(include_incomplete=True)
    if a.groups:
        unknown = set(a.groups) - {g.name for g in groups}
        if unknown:
            from .errors import GroupNotFoundError

            raise GroupNotFoundError(f"No group {sorted(unknown)[0]!r} in {a.store}; groups: "
                                     f"{', '.join(g.name for g in groups) or '(none)'}")
        groups = [g for g in groups if g.name in a.groups]
    bad = 0
    for g in groups:
        problems = g.verify()
        if problems:
            bad += 1
            print(f"FAIL {g.name}")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"ok   {g.name}")
    print(f"{len(groups) - bad} of {len(groups)} group(s) verified")
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


def _cmd_layers(a) -> int:
    import contextlib
    import io

    _models.check_model_name(a.model)
    import timm

    with contextlib.redirect_stderr(io.StringIO()):
        model = timm.create_model(a.model, pretrained=False)
    for name in _models.list_layers(model):
        print(name)
    return 0


def _cmd_datasets(a) -> int:
    for name in sorted(_datasets.DATASETS):
        e = _datasets.DATASETS[name]
        print(f"{name:14s} splits: {','.join(e.splits):16s} {e.description}")
    print(f"{'imagefolder:PATH':14s} splits: train,test[,val] class-per-folder tree (train/test subfolders or a seeded 80/20 split)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featstore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    p = sub.add_parser("ls", help="list the groups of a store")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include incomplete (building) groups")
    p = sub.add_parser("info", help="show a group's full extraction spec and provenance")
    p.add_argument("group")
    p.add_argument("--store", default=DEFAULT_STORE)
    p = sub.add_parser("verify", help="check every chunk is present and readable, no NaN/Inf, labels in range")
    p.add_argument("groups", nargs="*", help="groups to check (default: all)")
    p.add_argument("--store", default=DEFAULT_STORE)
    p = sub.add_parser("rm", help="delete groups (named, or every incomplete one); never one being built",
                       description="Delete feature groups. Every name is checked and every group's build lock "
                       "taken before anything is deleted, so an unknown name or a group being built changes nothing.")
    p.add_argument("groups", nargs="*", help="group names (see `featstore ls --all`)")
    p.add_argument("--incomplete", action="store_true",
                   help="also every incomplete group (killed builds) and leftover temporary folders")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; delete nothing")
    p.add_argument("--store", default=DEFAULT_STORE)
    p = sub.add_parser("layers", help="list a timm model's layer names")
    p.add_argument("model")
    sub.add_parser("datasets", help="list the registered datasets")
    _extend(sub)
    return parser


COMMANDS = {"build": _cmd_build, "ls": _cmd_ls, "info": _cmd_info, "verify": _cmd_verify, "rm": _cmd_rm,
            "layers": _cmd_layers, "datasets": _cmd_datasets}


def _extend(sub) -> None:
    """Sub-commands contributed by ``pipelines`` (sweep, report), when it is installed."""
    try:
        from pipelines import _cli as pipelines_cli
    except ImportError:
        return
    pipelines_cli.register(sub, COMMANDS)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FeatstoreError as e:
        print(f"featstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # missing dataset files and the like
        print(f"featstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featstore {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
