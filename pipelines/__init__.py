"""pipelines: sweeps, launchers, analysis and reports."""
