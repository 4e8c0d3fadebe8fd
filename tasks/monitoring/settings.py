"""The thresholds of ``shoprank monitor`` and the result of one check.

:class:`MonitorSettings` is the ``monitor:`` section of the config: defaults in code, every field
documented. The drift thresholds were set on the demo shop (20k events with seeds 0-11, 200k
with seeds 0-3; the last 7 days against the 53 before them): unshifted, the event-type mix
stays below 0.025, the sub-category mix below 0.11, the log-price distance below 0.14, unknown
users below 3% and unknown items below 12% of the events, and at least 70% of the recent
top-100 items stay in the new top 100. Distances of smaller samples read higher (sampling
noise): a shop with few new events per category may need a higher ``max_category_distance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.metrics import ACCURACY_METRICS

OK, FLAGGED, SKIPPED = "OK", "FLAGGED", "SKIPPED"


class MonitorSettings(BaseModel):
    """When the champion counts as decayed and the shop as drifted."""

    model_config = ConfigDict(extra="forbid")

    decay_metric: str = Field(
        "ndcg@10", description="Realised metric compared with the gate's figure for the "
        "champion (the figure passed in must be this metric).")
    decay_tolerance: float = Field(
        0.1, ge=0, lt=1, description="Relative drop of the realised metric below the gate's "
        "figure that counts as decay: flagged when realised < gate * (1 - decay_tolerance).")
    decay_days: int = Field(
        2, ge=1, description="The realised metric is pooled over the users of the last this "
        "many days with requests (a users-weighted mean of the daily values).")
    min_decay_users: int = Field(
        50, ge=1, description="Fewer evaluated users in those days: the decay check is skipped "
        "(too noisy to act on).")
    max_event_type_distance: float = Field(
        0.1, gt=0, le=1, description="Largest Jensen-Shannon distance (natural log, 0..0.83) "
        "between the event-type mix of the training events and of the new events.")
    max_category_distance: float = Field(
        0.15, gt=0, le=1, description="Largest Jensen-Shannon distance between the category_id "
        "mix of the events (category joined from the catalogue) before and after; the mix of "
        "sub-categories moves by up to 0.09 as items rise and fade.")
    max_price_distance: float = Field(
        0.2, gt=0, description="Largest Wasserstein distance between the log(1 + price) of the "
        "events before and after, divided by its standard deviation before (the price of the "
        "event, else of its item in the catalogue).")
    max_unknown_user_share: float = Field(
        0.3, ge=0, le=1, description="Largest share of new events from users the champion never "
        "saw (they are served the fallback); raise it for shops with many one-off visitors.")
    max_unknown_item_share: float = Field(
        0.2, ge=0, le=1, description="Largest share of new events on items the champion never "
        "saw (it cannot recommend them).")
    top_items: int = Field(
        100, ge=1, description="How many of the most-interacted items the popularity check "
        "compares.")
    popularity_days: float = Field(
        7.0, gt=0, description="The popularity check takes the champion's top items from its "
        "last this many days of events (what its recent-popularity fallback sees).")
    min_top_overlap: float = Field(
        0.5, ge=0, le=1, description="Least share of the champion's recent top items that are "
        "still among the top items of the new events.")

    @field_validator("decay_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        name, _, k = value.partition("@")
        if name not in ACCURACY_METRICS or not k.isdigit() or int(k) < 1:
            raise ValueError(f"decay_metric must be one of {', '.join(ACCURACY_METRICS)} at a "
                             f"cut-off, like 'ndcg@10'; got {value!r}")
        return value


@dataclass(frozen=True)
class CheckResult:
    """One monitoring check, as ``shoprank monitor`` prints it.

    Attributes:
        name: What is checked (``decay ndcg@10``, ``event_type_mix``, ...).
        value: The measured value; None when the check could not run (see ``detail``).
        threshold: The bound the value is compared with.
        flagged: True when the value is beyond the bound.
        detail: One sentence: what was measured on what, or why the check was skipped.
        bound: ``max`` when the value may not exceed the threshold, ``min`` when it may not
            fall below it.
        tool: What computed the value: ``gx`` (Great Expectations), ``scipy`` or ``polars``.
    """

    name: str
    value: float | None
    threshold: float
    flagged: bool
    detail: str
    bound: Literal["max", "min"] = "max"
    tool: str = "polars"

    @property
    def status(self) -> str:
        """``OK``, ``FLAGGED`` or ``SKIPPED`` (no value)."""
        if self.value is None:
            return SKIPPED
        return FLAGGED if self.flagged else OK

    def line(self) -> str:
        """One line: name, value, bound and status, e.g. ``event_type_mix 0.0109 <= 0.1000 OK``."""
        value = "n/a" if self.value is None else f"{self.value:.4f}"
        op = "<=" if self.bound == "max" else ">="
        return f"{self.name:<22} {value:>8} {op} {self.threshold:<8.4f} {self.status}"


def skipped(name: str, threshold: float, reason: str, bound: Literal["max", "min"] = "max"
            ) -> CheckResult:
    """A check that could not run, with the reason."""
    return CheckResult(name, None, threshold, False, reason, bound)
