"""`featstore sweep` and `featstore report`, registered into featstore's command line through
the ``featstore.commands`` entry point (featstore never imports pipelines)."""

from __future__ import annotations

from featstore import params

from ._report import ReportOptions
from ._sweep import SweepRun

__all__ = ["register"]


def _cmd_sweep(a) -> int:
    from ._analysis import dr_table, interval_note
    from ._spec import load_spec
    from ._sweep import check_run, run_sweep

    options = params.parse_arguments(SweepRun, a)
    check_run(options, key_format=params.cli_key(params.flags(SweepRun)))  # the options first, by their flags
    spec = load_spec(a.spec, store=a.store)
    df = run_sweep(spec, a.out, **options)
    print(f"{len(df)} draws in {a.out} (pipelines.load_results({a.out!r}))")
    if "random" in set(df["mode"]):
        table = dr_table(df)
        print(f"Diffused redundancy DR(δ), random neurons [{interval_note(table.attrs['covers'])}]:")
        print(table.to_string())
    return 0


def _cmd_report(a) -> int:
    from ._report import ReportOptions, write_report

    options = params.parse_arguments(ReportOptions, a)
    params.validate(ReportOptions, options, key_format=params.cli_key(params.flags(ReportOptions)))
    path = write_report(a.results, a.out, **options)
    print(f"{'Figure' if options.get('figure') else 'Report'}: {path}")
    return 0


def register(sub, commands) -> None:
    p = sub.add_parser("sweep", help="run a declarative sweep of probes and CKA over cached features",
                       description="Expand a TOML sweep spec into tasks and run them; resumable.")
    p.add_argument("spec", help="sweep spec (TOML)")
    p.add_argument("--out", required=True, help="output directory (results/, done/, sweep.json)")
    p.add_argument("--store", default=None, help="override the spec's store path")
    params.add_arguments(p, SweepRun)
    p = sub.add_parser("report", help="figures and an HTML page from a sweep's results",
                       description="Write a sweep's figures (PNG, SVG, PDF) and one self-contained HTML page: the "
                                   "answer (DR per pairing) first, then the figures, then the detailed tables.")
    p.add_argument("results", help="sweep output directory")
    p.add_argument("--out", default=None, help="report directory (default: RESULTS/report)")
    params.add_arguments(p, ReportOptions)
    commands["sweep"] = _cmd_sweep
    commands["report"] = _cmd_report
