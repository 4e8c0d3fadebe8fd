"""The monitor's verdict: whether the champion decayed or the shop drifted.

Decay: the realised ``decay_metric`` (default NDCG@10), pooled over the users of the last
``decay_days`` days with requests, is below the gate's figure for the champion by more than
``decay_tolerance`` (relative). Drift: any drift check flagged. :func:`verdict` returns the
checks, the line ``shoprank monitor`` prints for each, and whether anything is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from models.errors import ConfigError
from tasks.monitoring.realised import DAY, USERS
from tasks.monitoring.settings import CheckResult, MonitorSettings, skipped


@dataclass(frozen=True)
class Verdict:
    """The checks of one monitor run.

    Attributes:
        decay: The decay check.
        drift: The drift checks.
    """

    decay: CheckResult
    drift: list[CheckResult]

    @property
    def checks(self) -> list[CheckResult]:
        """The decay check first, then the drift checks."""
        return [self.decay, *self.drift]

    @property
    def decayed(self) -> bool:
        """True when the decay check is flagged."""
        return self.decay.flagged

    @property
    def drifted(self) -> bool:
        """True when any drift check is flagged."""
        return any(check.flagged for check in self.drift)

    @property
    def flagged(self) -> bool:
        """True when anything is flagged (decay or drift)."""
        return self.decayed or self.drifted

    @property
    def lines(self) -> list[str]:
        """One line per check: name, value, bound, threshold, ``OK``/``FLAGGED``/``SKIPPED``."""
        return [check.line() for check in self.checks]


def pooled(daily: pl.DataFrame, metric: str, days: int) -> tuple[float | None, int, list]:
    """The users-weighted mean of ``metric`` over the last ``days`` days with users.

    Returns:
        ``(value, users, days used)``; the value is None when no day has users.
    """
    last = daily.filter(pl.col(USERS) > 0).sort(DAY).tail(days)
    users = int(last[USERS].sum()) if last.height else 0
    if not users:
        return None, 0, []
    value = float((last[metric] * last[USERS]).sum() / users)
    return value, users, last[DAY].to_list()


def decay_check(daily: pl.DataFrame, gate_value: float | None,
                settings: MonitorSettings | None = None) -> CheckResult:
    """Compare the recent realised metric with the gate's figure for the champion.

    Args:
        daily: :func:`tasks.monitoring.realised.realised_quality`'s table.
        gate_value: The gate's ``decay_metric`` for the champion (the ``test.ndcg_at_10`` tag of
            its version); None when it has none.
        settings: Thresholds; default ``MonitorSettings()``.

    Returns:
        The ``decay <metric>`` check; skipped without a gate figure, without evaluated users,
        or with fewer than ``min_decay_users`` users in the days pooled.

    Raises:
        ConfigError: ``daily`` has no column for ``decay_metric``, or the gate figure is not a
            finite non-negative number.
    """
    s = settings or MonitorSettings()
    name = f"decay {s.decay_metric}"
    if s.decay_metric not in daily.columns:
        raise ConfigError(f"the realised quality has no {s.decay_metric} (columns: "
                          f"{', '.join(daily.columns)}); score it with that cut-off in ks or "
                          "set monitor.decay_metric to one of its metrics.")
    if gate_value is None:
        return skipped(name, math.nan, "the champion has no recorded gate figure", "min")
    if not math.isfinite(gate_value) or gate_value < 0:
        raise ConfigError(f"the gate's {s.decay_metric} must be a finite number >= 0; got "
                          f"{gate_value!r}.")
    threshold = gate_value * (1 - s.decay_tolerance)
    value, users, days = pooled(daily, s.decay_metric, s.decay_days)
    if value is None:
        return skipped(name, threshold, "no user could be evaluated on the new events", "min")
    span = f"{days[0]}..{days[-1]}" if len(days) > 1 else f"{days[0]}"
    if users < s.min_decay_users:
        return skipped(name, threshold, f"only {users} users on {span} (fewer than "
                       f"min_decay_users = {s.min_decay_users})", "min")
    detail = (f"realised over {len(days)} day(s) {span} ({users:,} users); gate figure "
              f"{gate_value:.4f}, decay below {threshold:.4f} (-{s.decay_tolerance:.0%})")
    return CheckResult(name, value, threshold, value < threshold, detail, "min", "polars")


def verdict(daily: pl.DataFrame, gate_value: float | None, drift: Sequence[CheckResult],
            settings: MonitorSettings | None = None) -> Verdict:
    """The decay check (:func:`decay_check`) beside the drift checks."""
    return Verdict(decay_check(daily, gate_value, settings), list(drift))
