"""pipelines: sweeps, launchers (local, joblib, dask), analysis and reports.

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
from ._report import write_report
from ._sweep import LAUNCHERS, SweepSpec, Task, expand_tasks, load_results, load_spec, run_sweep, run_task

__all__ = ["load_spec", "SweepSpec", "Task", "expand_tasks", "run_sweep", "run_task", "load_results", "LAUNCHERS",
           "accuracy_curve", "diffused_redundancy", "dr_table", "critical_fraction", "gini",
           "coefficient_of_variation", "inequality_curve", "modes_at_equal_k", "write_report"]
