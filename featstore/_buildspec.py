"""Build specs: a study's builds in one file (``featstore build --spec builds.toml``).

.. code-block:: toml

    store = "data/featstore.zarr"     # any build option, at the top: every entry's default

    [[builds]]
    model = "resnet50"
    layers = ["pre_logits", "layer3"]
    dataset = "cifar10"
    splits = ["train", "test"]

    [[builds]]                        # a list of models and/or datasets: every combination
    model = ["resnet18", "open_clip:ViT-B-32@laion2b_s34b_b79k"]
    dataset = ["cifar10", "imagefolder:data/imagenet-v2"]   # relative paths: from this file's folder

Every key is a build option (:class:`featstore.BuildOptions`, the command line's
``--limit`` is ``limit``); options given on the command line override the file (``--limit
100`` runs a quick version of every build). The spec expands into *passes*, one per (entry,
split): one backbone pass over one split, writing its layers' groups. Every entry is checked
before any pass starts (one error naming ``builds[2].limit``); what only a pass can find (a
layer its model lacks, a bad image) fails that pass, reported with why at the end while the
others run. ``--launcher local`` runs the passes here, one after another (each on ``--jobs``
workers if given); joblib, dask and slurm run each pass as one task. Resumable: a re-run
skips complete groups and resumes partial ones.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import FeatstoreError, IncompatibleParametersError, MissingKeyError, SpecNotFoundError, SpecSyntaxError
from .params import validate

__all__ = ["Pass", "load_build_spec", "run_build_spec", "run_one"]

ENTRIES = "builds"
PATH_KEYS = ("store", "root", "checkpoint")
EXPANDED = ("model", "dataset")  # a list of these in an entry: one build per combination


@dataclass(frozen=True)
class Pass:
    """One backbone pass of a spec: an entry's options for one split."""

    entry: int
    split: str
    options: dict

    def label(self) -> str:
        from ._build import BuildOptions

        def value(key):
            return self.options.get(key, BuildOptions.model_fields[key].default)

        return f"builds[{self.entry}] {value('model')} {value('dataset')}:{self.split}" + \
            (f" limit {value('limit')}" if value("limit") else "")


def _relative_to(raw: dict, folder: Path) -> None:
    from .datasets import resolve_dataset_path

    def resolve(text):
        if not isinstance(text, str) or "://" in text or Path(text).expanduser().is_absolute():
            return text
        return str((folder / text).resolve())

    for table in [raw] + [e for e in raw.get(ENTRIES, []) if isinstance(e, dict)]:
        for key in PATH_KEYS:
            if key in table:
                table[key] = resolve(table[key])
        dataset = table.get("dataset")
        if isinstance(dataset, str):
            table["dataset"] = resolve_dataset_path(dataset, folder)
        elif isinstance(dataset, list):
            table["dataset"] = [resolve_dataset_path(d, folder) if isinstance(d, str) else d for d in dataset]


def _expand(entry: dict) -> list[dict]:
    """An entry with lists of models and/or datasets: one entry per combination, in order."""
    import itertools

    keys = [k for k in EXPANDED if isinstance(entry.get(k), list)]
    if not keys:
        return [entry]
    return [{**entry, **dict(zip(keys, values))} for values in itertools.product(*(entry[k] for k in keys))]


def load_build_spec(source, overrides: dict | None = None, check_data: bool = True) -> list[Pass]:
    """The spec's passes, every entry checked (types, names, splits, the launch options)
    before any work. ``source``: a TOML file or a dict; ``overrides``: options over every entry;
    ``check_data=False`` leaves the datasets' files unchecked (a spec for another machine)."""
    from ._build import BuildOptions, check_dataset

    if isinstance(source, dict):
        raw, where = dict(source), "build spec"
    else:
        path = Path(source)
        if not path.is_file():
            raise SpecNotFoundError(path=str(path), kind="build")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SpecSyntaxError(path=str(path), reason=str(e), kind="build") from None
        _relative_to(raw, path.resolve().parent)
        where = str(path)
    entries = raw.pop(ENTRIES, None)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise MissingKeyError(key=ENTRIES, expected=f"one [[{ENTRIES}]] table per build in {where} (each with its "
                                                    f"model, dataset, layers, splits, ...)")
    validate(BuildOptions, raw)  # the defaults on their own: an unknown key is named at the top
    passes = []
    for i, entry in ((i, e) for i, table in enumerate(entries) for e in _expand(table)):
        merged = {**raw, **entry, **(overrides or {})}
        o = validate(BuildOptions, merged, key_format=lambda k, i=i: f"{ENTRIES}[{i}].{k}")
        if check_data:
            try:
                check_dataset(o)
            except FeatstoreError as e:
                raise e.within(f"{ENTRIES}[{i}]") from None
        try:
            from ._sources import parse_model_name

            parse_model_name(o.model)
        except FeatstoreError as e:
            raise e.within(f"{ENTRIES}[{i}]") from None
        passes += [Pass(i, split, {**merged, "splits": [split]}) for split in o.splits]
    return passes


@dataclass
class Outcome:
    """What one pass did: ``built`` / ``complete`` (already) / ``failed``, its groups, why."""

    index: int  # the pass's position in the spec's passes
    label: str
    state: str
    groups: list
    why: str = ""


def run_one(p: Pass, index: int = 0, threads: int | None = None, die_with_parent: bool = False) -> Outcome:
    """One pass (in this process or a launcher's worker): its build, or why it failed."""
    from . import _launchers
    from ._build import build

    if die_with_parent:
        _launchers.die_with_parent()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        groups = build(**p.options)
    except FeatstoreError as e:
        return Outcome(index, p.label(), "failed", [], str(e))
    now = [g.name for g in groups if getattr(g, "built_now", True)]
    return Outcome(index, p.label(), "built" if now else "complete", [g.name for g in groups])


def run_build_spec(source, overrides: dict | None = None, say=None) -> list[Outcome]:
    """Every pass of the spec, through the launcher the spec or the overrides name; the
    outcomes in the spec's order."""
    import os
    import sys

    from ._launchers import LAUNCHERS, Call, Run
    from ._slurm import SlurmOptions, given_slurm

    say = say or (lambda m: print(m, file=sys.stderr))
    passes = load_build_spec(source, overrides)
    first = passes[0].options
    launcher = first.get("launcher", "local")
    if any(p.options.get("launcher", "local") != launcher for p in passes):
        raise IncompatibleParametersError(key="launcher", value=launcher,
                                          reason="one spec runs on one launcher: set it at the top, not per entry")
    if launcher != "local":
        # the passes are the launcher's tasks, each a one-process build
        for p in passes:
            if (p.options.get("jobs") or 1) > 1 or p.options.get("devices"):
                raise IncompatibleParametersError(key="jobs", value=p.options.get("jobs"), reason=(
                    f"--launcher {launcher} runs each pass of a spec as one task; --jobs and --devices share one "
                    f"pass among local workers (with --launcher local)"))
            p.options.update(launcher="local")
    say(f"featstore build: {len(passes)} pass(es) from {len(set(p.entry for p in passes))} build(s)"
        + (f" on {launcher}" if launcher != "local" else ""))
    results: dict[int, Outcome] = {}
    calls = [Call(run_one, (p, i), key=f"pass-{i}-{p.entry}-{p.split}") for i, p in enumerate(passes)]
    from ._build import BuildOptions
    from .params import validate as _validate

    o = _validate(BuildOptions, {**first, "launcher": launcher})
    # local: the passes here, one after another (each may share itself among --jobs workers)
    workers = 1 if launcher == "local" else o.jobs or os.cpu_count() or 1
    run = Run(workers=workers, device=o.device, scheduler=o.scheduler,
              slurm=SlurmOptions(**given_slurm(o)) if launcher == "slurm" else None,
              log_dir=str(Path(str(o.store)).parent))
    LAUNCHERS[launcher].run(calls, run, lambda out: results.__setitem__(out.index, out))
    return [results[i] for i in range(len(passes))]


def summary(outcomes: list[Outcome]) -> tuple[str, bool]:
    """The end-of-run table, and whether every pass succeeded."""
    counts = {s: sum(o.state == s for o in outcomes) for s in ("built", "complete", "failed")}
    lines = [f"{len(outcomes)} pass(es): {counts['built']} built, {counts['complete']} already complete, "
             f"{counts['failed']} failed"]
    for o in outcomes:
        lines.append(f"  {o.state:<9} {o.label}" + (f": {o.why}" if o.why else f" ({len(o.groups)} group(s))"))
    return "\n".join(lines), counts["failed"] == 0
