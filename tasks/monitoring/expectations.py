"""Shares of new events from unknown users and on unknown items, checked with Great Expectations.

The suite is ``expectations/monitoring.json``, run (like the data contracts of
:mod:`tasks.checks.validate`) on an in-memory pandas batch of an ephemeral GX context. Each event
gets the derived columns ``_user_known`` and ``_item_known`` (is its user / item among those of
the champion's training events); an ``expect_column_values_to_be_in_set([true], mostly=...)``
passes while the known share stays at or above ``1 - max_unknown_*_share``. GX's
``unexpected_percent`` is the unknown share reported. ``great_expectations`` is imported only
when the suite runs: the import takes seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from models.columns import ITEM, USER
from models.errors import ConfigError, require_columns
from tasks.checks.validate import load_suite_spec
from tasks.monitoring.settings import CheckResult, MonitorSettings, skipped

logger = logging.getLogger(__name__)

SUITE = "monitoring"
USER_KNOWN = "_user_known"
ITEM_KNOWN = "_item_known"
_WHAT = {USER_KNOWN: (USER, "users", "come from"), ITEM_KNOWN: (ITEM, "items", "are on")}
"""Derived column -> (source column, noun, verb) of the report."""


def known_flags(reference: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """``new`` with ``_user_known`` and ``_item_known``: seen in the ``reference`` events."""
    require_columns(reference.columns, (USER, ITEM), "champion's events")
    require_columns(new.columns, (USER, ITEM), "new events")
    return new.with_columns(
        pl.col(column).cast(pl.String).is_in(
            reference[column].cast(pl.String).unique().implode()).fill_null(False).alias(flag)
        for flag, (column, _, _) in _WHAT.items()
    )


def suite_parameters(settings: MonitorSettings) -> dict[str, float]:
    """The values of the suite's ``$PARAMETER`` bounds."""
    return {"min_known_user_share": 1 - settings.max_unknown_user_share,
            "min_known_item_share": 1 - settings.max_unknown_item_share}


def unknown_share_checks(
    reference: pl.DataFrame,
    new: pl.DataFrame,
    settings: MonitorSettings | None = None,
    suites_dir: Path | None = None,
) -> list[CheckResult]:
    """Run the monitoring suite: one check per expectation (``unknown_users``, ``unknown_items``).

    Args:
        reference: The champion's training events (``user_id, item_id``).
        new: The events since (``user_id, item_id``).
        settings: Thresholds; default ``MonitorSettings()``.
        suites_dir: Folder of ``monitoring.json``; default the project's ``expectations/``.

    Returns:
        The checks in the suite's order; the value is the unknown share of the new events.

    Raises:
        ConfigError: The suite cannot be read, names an unknown setting, or GX could not
            evaluate an expectation.
    """
    settings = settings or MonitorSettings()
    spec = load_suite_spec(SUITE, suites_dir)
    metas = [e.get("meta", {}) for e in spec["expectations"]]
    for meta in metas:
        if meta.get("setting") not in MonitorSettings.model_fields:
            raise ConfigError(f"the {SUITE} suite names the setting {meta.get('setting')!r}, "
                              "which MonitorSettings does not have; fix meta.setting.")
    if new.is_empty():
        return [skipped(m.get("check", SUITE), getattr(settings, m["setting"]), "no new events")
                for m in metas]
    flagged = known_flags(reference, new)
    results = _run_gx(spec, flagged.select(USER_KNOWN, ITEM_KNOWN).to_pandas(),
                      suite_parameters(settings))
    return [_check(result, meta, flagged, settings)
            for result, meta in zip(results, metas, strict=True)]


def _check(result: Any, meta: dict[str, Any], flagged: pl.DataFrame,
           settings: MonitorSettings) -> CheckResult:
    """A GX validation result as a :class:`CheckResult`."""
    column = result.expectation_config.kwargs.get("column")
    if column not in _WHAT:
        raise ConfigError(f"the {SUITE} suite checks column {column!r}; it may check only "
                          f"{', '.join(_WHAT)} (the columns derived before it runs).")
    info = result.exception_info or {}
    percent = result.result.get("unexpected_percent")
    if info.get("raised_exception") or percent is None:
        raise ConfigError(f"Great Expectations could not check {column} in the {SUITE} suite: "
                          f"{info.get('exception_message', 'no result')}. Fix the expectation.")
    source, noun, verb = _WHAT[column]
    unknown = flagged.filter(~pl.col(column))
    detail = (f"{unknown.height:,} of {flagged.height:,} new events {verb} {noun} the champion "
              f"never saw ({unknown[source].n_unique():,} distinct)")
    if not result.success and meta.get("fix"):
        detail = f"{detail}. {meta['fix']}"
    return CheckResult(meta.get("check", column), percent / 100, getattr(settings, meta["setting"]),
                       not result.success, detail, "max", "gx")


def _run_gx(spec: dict[str, Any], frame: Any, params: dict[str, Any]) -> list[Any]:
    """Validate a pandas frame against the suite ``spec`` in an ephemeral GX context.

    Results come back in the suite's order.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(f"shoprank_{SUITE}").add_dataframe_asset(SUITE)
    definition = gx.ValidationDefinition(
        name=SUITE, data=asset.add_batch_definition_whole_dataframe("whole"),
        suite=context.suites.add(gx.ExpectationSuite(**spec)),
    )
    result = context.validation_definitions.add(definition).run(
        batch_parameters={"dataframe": frame}, expectation_parameters=params)
    order = [e["kwargs"].get("column") for e in spec["expectations"]]
    return sorted(result.results,
                  key=lambda r: order.index(r.expectation_config.kwargs.get("column")))
