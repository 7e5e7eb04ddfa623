"""`featstore sweep` and `featstore report` (registered into featstore's CLI)."""

from __future__ import annotations


from ._sweep import LAUNCHERS

__all__ = ["register"]


def _cmd_sweep(a) -> int:
    from ._analysis import dr_table
    from ._sweep import load_spec, run_sweep

    spec = load_spec(a.spec, store=a.store)
    df = run_sweep(spec, a.out, launcher=a.launcher, workers=a.workers, scheduler=a.scheduler, device=a.device,
                   progress=a.progress)
    print(f"{len(df)} draws in {a.out} (pipelines.load_results({a.out!r}))")
    if "random" in set(df["mode"]):
        print("Diffused redundancy DR(δ), random neurons [95% seed-bootstrap interval]:")
        print(dr_table(df).to_string())
    return 0


def _cmd_report(a) -> int:
    from ._report import write_report

    page = write_report(a.results, a.out)
    print(f"Report: {page}")
    return 0


def register(sub, commands) -> None:
    p = sub.add_parser("sweep", help="run a declarative sweep of probes and CKA over cached features",
                       description="Expand a TOML sweep spec into tasks and run them; resumable.")
    p.add_argument("spec", help="sweep spec (TOML)")
    p.add_argument("--out", required=True, help="output directory (results/, done/, sweep.json)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS, help="(default: %(default)s)")
    p.add_argument("--scheduler", default=None, help="dask scheduler address (tcp://host:8786) for many machines")
    p.add_argument("--workers", type=int, default=None, help="processes for joblib / a local dask cluster")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--store", default=None, help="override the spec's store path")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p = sub.add_parser("report", help="figures and an HTML page from a sweep's results")
    p.add_argument("results", help="sweep output directory")
    p.add_argument("--out", default=None, help="report directory (default: RESULTS/report)")
    commands["sweep"] = _cmd_sweep
    commands["report"] = _cmd_report
