"""pipelines: sweeps, launchers (local, joblib, dask, slurm), analysis and reports.

>>> import pipelines
>>> df = pipelines.run_sweep("sweeps/demo.toml", "results/demo", launcher="joblib")
>>> pipelines.load_results("results/demo")
>>> pipelines.dr_table(df)
"""

from ._analysis import (
    accuracy_curve,
    coefficient_of_variation,
    critical_fraction,
    diffused_redundancy,
    dr_table,
    gini,
    inequality_curve,
    modes_at_equal_k,
)
from featstore._launchers import LAUNCHERS, Launcher
from ._report import write_report
from ._results import load_results
from featstore._slurm import SlurmOptions
from ._spec import GroupTable, SweepSpec, load_spec
from ._sweep import SweepRun, run_sweep
from ._tasks import FeatureCache, Task, expand_tasks, plan_fits, run_fit, run_task

__all__ = ["load_spec", "SweepSpec", "GroupTable", "SweepRun", "Task", "expand_tasks", "plan_fits", "run_fit", "run_sweep", "run_task",
           "load_results", "LAUNCHERS", "Launcher", "SlurmOptions", "FeatureCache", "accuracy_curve", "diffused_redundancy",
           "dr_table", "critical_fraction", "gini", "coefficient_of_variation", "inequality_curve",
           "modes_at_equal_k", "write_report"]
