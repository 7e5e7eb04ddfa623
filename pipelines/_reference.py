"""Every declared parameter as a Markdown reference (``docs/parameters.md``), generated from
the declarations themselves, so the documentation cannot drift from the code.

    python -m pipelines.reference > docs/parameters.md      # or: make docs
"""

from __future__ import annotations

from featstore import BuildOptions
from featstore.params import describe, field_type

__all__ = ["parameters_markdown"]


def _table(model, key_prefix: str = "", flag=None) -> list[str]:
    rows = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        allowed = describe(field_type(model, name)).replace(" (or left out)", "")
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = "(the table's defaults)"
        elif isinstance(default, (list, tuple)):
            default = ", ".join(map(str, default)) if len(default) <= 8 else f"{len(default)} values (see the code)"
        if flag:
            shown = f"`--no-{flag(name)[2:]}`" if default is True else f"`{flag(name)}`"
        else:
            shown = f"`{key_prefix}{name}`"
        meaning = " ".join((f.description or "").split()).replace("|", "\\|")
        rows.append(f"| {shown} | {allowed.replace('|', '/')} | {'' if default is None else f'`{default}`'} | {meaning} |")
    return rows


def parameters_markdown() -> str:
    """The reference page: build options, sweep run options, the sweep spec's tables and the
    estimator's parameters, each table generated from its one declaration."""
    import probes
    from featstore.params import flags

    from ._spec import GroupTable, MetricsTable, SelectionTable, SplitTable, SweepSpec
    from ._report import ReportOptions
    from ._sweep import SweepRun

    out = ["# Parameters", "",
           "Generated from the declarations by `make docs` (`python -m pipelines.reference`); "
           "a test fails when this file and the code disagree.", ""]
    sections = [
        ("`featstore build` / `featstore.build()`", BuildOptions, dict(flag=flags(BuildOptions).get)),
        ("`featstore sweep` / `pipelines.run_sweep()`", SweepRun, dict(flag=flags(SweepRun).get)),
        ("`featstore report` / `pipelines.write_report()`", ReportOptions, dict(flag=flags(ReportOptions).get)),
        ("Sweep spec: top level", SweepSpec, {}),
        ("Sweep spec: `[[groups]]`", GroupTable, dict(key_prefix="groups[i].")),
        ("Sweep spec: `[[groups]]` `train = {...}` / `test = {...}`", SplitTable, dict(key_prefix="train.")),
        ("Sweep spec: `[selection]`", SelectionTable, dict(key_prefix="selection.")),
        ("Sweep spec: `[probe]` (= `probes.Protocol`)", probes.Protocol, dict(key_prefix="probe.")),
        ("Sweep spec: `[metrics]`", MetricsTable, dict(key_prefix="metrics.")),
        ("`probes.SubsetProbes(...)`", probes.SubsetProbesParameters, {}),
        ("`probes.subset_cka(...)` / `cross_cka` options (= `probes.CKAOptions`)", probes.CKAOptions, {}),
    ]
    for title, model, kw in sections:
        out += [f"## {title}", ""] + _table(model, **kw) + [""]
    registries = [("Selection modes", probes.SELECTION_MODES), ("CKA estimators", probes.CKA_ESTIMATORS),
                  ("Protocol presets (`SubsetProbes.from_preset`, the spec's `preset`)", probes.PRESETS)]
    from featstore import PREPROCESSING, WEIGHT_MAPPINGS, WEIGHT_SOURCES
    from featstore.models import CHECKPOINT_ADAPTERS

    from featstore._launchers import LAUNCHERS

    registries += [("Preprocessing presets (`featstore build --preset`)", PREPROCESSING), ("Weight sources", WEIGHT_SOURCES),
                   ("Weight mappings", WEIGHT_MAPPINGS), ("Checkpoint adapters (applied when a checkpoint has their layout)",
                                                          CHECKPOINT_ADAPTERS), ("Launchers", LAUNCHERS)]
    out += ["## Registries", ""]
    for title, registry in registries:
        out += [f"**{title}**", ""] + [f"- `{name}`: {entry.description}" for name, entry in registry.items()] + [""]
    return "\n".join(out).rstrip() + "\n"
