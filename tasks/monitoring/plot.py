"""A PNG of the champion's realised quality per day, and of the drift values per day.

Top panel: the realised ``decay_metric`` per day (and, when given, the returning-user variant)
against the gate's figure and the decay threshold. Bottom panel (when the daily drift is given):
each drift value divided by its threshold, so that every check crosses 1 where it would be
flagged (for ``top_items_overlap``, ``(1 - overlap) / (1 - min_top_overlap)``). A day holds
fewer events than the whole window, so its distances read higher (sampling noise): on the
unshifted 200k-event demo shop the daily category mix sits near its threshold while the week's
is at half of it. The thresholds apply to the whole window, as
:func:`tasks.monitoring.drift.drift_checks` uses them. Drawn on a matplotlib ``Figure`` without
pyplot: no global state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from tasks.monitoring.realised import DAY
from tasks.monitoring.settings import MonitorSettings

DRIFT_THRESHOLDS = {
    "event_type_mix": "max_event_type_distance",
    "unknown_users": "max_unknown_user_share",
    "unknown_items": "max_unknown_item_share",
    "category_mix": "max_category_distance",
    "price": "max_price_distance",
}
"""Daily drift column -> the MonitorSettings field of its threshold."""


def drift_ratios(drift: pl.DataFrame, settings: MonitorSettings) -> pl.DataFrame:
    """``day`` and each drift value divided by its threshold (1 = where it would be flagged)."""
    ratios = [pl.col(column) / getattr(settings, field)
              for column, field in DRIFT_THRESHOLDS.items() if column in drift.columns]
    if "top_items_overlap" in drift.columns:
        room = max(1 - settings.min_top_overlap, 1e-9)
        ratios.append(((1 - pl.col("top_items_overlap")) / room).alias("top_items_overlap"))
    return drift.select(DAY, *ratios)


def plot_monitor(
    daily: pl.DataFrame,
    gate_value: float | None,
    path: Path,
    settings: MonitorSettings | None = None,
    drift: pl.DataFrame | None = None,
    returning: pl.DataFrame | None = None,
) -> Path:
    """Write the monitor's plot to ``path`` (PNG; parent folders created) and return it.

    Args:
        daily: Realised quality per day (:func:`tasks.monitoring.realised.realised_quality`).
        gate_value: The gate's figure for the champion; no reference lines without it.
        path: Where the PNG goes.
        settings: Metric and tolerance; default ``MonitorSettings()``.
        drift: :func:`tasks.monitoring.drift.daily_drift`'s table, for the second panel.
        returning: The returning-user variant of ``daily`` (no session), drawn beside it.
    """
    s = settings or MonitorSettings()
    panels = 2 if drift is not None and drift.height else 1
    fig = Figure(figsize=(11, 3.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    _quality_panel(axes[0], daily, gate_value, s, returning)
    if panels == 2:
        _drift_panel(axes[1], drift_ratios(drift, s))
    axes[-1].set_xlabel("day (UTC)")
    for label in axes[-1].get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _quality_panel(ax, daily: pl.DataFrame, gate_value: float | None, s: MonitorSettings,
                   returning: pl.DataFrame | None) -> None:
    metric = s.decay_metric
    ax.plot(daily[DAY].to_list(), daily[metric].to_list(), marker="o", label="realised (session)")
    if returning is not None and returning.height:
        ax.plot(returning[DAY].to_list(), returning[metric].to_list(), marker="s",
                linestyle=":", label="realised (returning users)")
    if gate_value is not None and math.isfinite(gate_value):
        ax.axhline(gate_value, color="tab:green", label=f"gate {gate_value:.4f}")
        threshold = gate_value * (1 - s.decay_tolerance)
        ax.axhline(threshold, color="tab:red", linestyle="--",
                   label=f"decay below {threshold:.4f} (-{s.decay_tolerance:.0%})")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Champion's realised {metric} per day")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def _drift_panel(ax, ratios: pl.DataFrame) -> None:
    days = ratios[DAY].to_list()
    for column in ratios.columns[1:]:
        ax.plot(days, ratios[column].to_list(), marker=".", label=column)
    ax.axhline(1.0, color="tab:red", linestyle="--", label="threshold")
    ax.set_ylabel("value / threshold")
    ax.set_ylim(bottom=0)
    ax.set_title("Drift of the new events per day (above 1: beyond its threshold)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
