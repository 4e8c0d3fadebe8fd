"""A seeded synthetic online shop: the sample data shoprank ships with.

:func:`generate_shop` returns the canonical ``events`` and ``items`` tables (see
:mod:`models.columns`) of a store whose behaviour has the structure recommenders learn from:

* **Catalogue**: eight top-level categories (grocery, beauty and pets are consumable), each with
  sub-categories. ``category_id`` is the path ``"c<top>/c<top>.<sub>"``, e.g. ``"c4/c4.2"`` is the
  third sub-category of electronics; the part before ``/`` is the top-level category. Brands
  belong to one top-level category; prices are log-normal around a level per sub-category.
* **Attributes and text**: each item has a colour, a material, a style and a use (8, 6, 5 and
  5 plain words, chosen to suit the top-level category: a grocery item's "colour" is a taste
  such as "spicy", its "material" a flavour such as "ginger"), drawn uniformly and independently.
  Titles read ``"<Brand> <style> <colour> <material> <sub-category name>"`` ("Kalo casual red
  cotton shirt"); the ``description`` column reads ``"A <style> <sub-category name> for <use>,
  in <colour> <material>."`` ("A casual shirt for the office, in red cotton."; consumables
  read "with" for "in"). Only the style and the colour reflect shoppers' tastes; the material
  and the use are noise, as the brand is.
* **Tastes**: each user prefers one or two styles and one or two colours, a function of the seed
  and the user's number only (:func:`generate_shop_batches` gives every user the tastes
  :func:`generate_shop` does). Each session takes one preferred style and one colour; 60% of its
  draws within a sub-category keep to the sub-category's items of that style, and half of those
  to the items of that style and colour, when any of them is on sale that day. About 60% of a
  user's views are of a preferred style (about 30% by chance), so the words of the items a user
  viewed tell which new items, even ones nobody has viewed yet, they will look at.
* **Popularity**: users and items have Zipf-like weights. Each item also has a launch day and a
  rise-and-fade curve (one evergreen staple per sub-category), so recent popularity predicts
  the next days better than all-time popularity.
* **Sessions**: each session follows one sub-category, sometimes a second (related) one. The next
  view is often the previous item's fixed complement, another item of the same sub-category or
  the same item again, so co-visitation and sequence signals exist.
* **Funnel**: about 7% of views lead to a cart, 40% of carts to a purchase at the end of the
  session, 2.5% of views to a favourite; consumables are bought again by the same user after a
  few weeks.
* **Time**: more sessions in the evening and at weekends, across ``n_days`` days ending at ``end``.
* **Regime change** (only with ``shift_day``, a day index ``D`` from the window's first calendar
  day): from the start of day ``D`` (UTC) a ninth top-level category, ``c8`` (wearables: three
  sub-categories of new items, new brands, higher prices), launches and 60% of the users adopt it
  on day ``D`` or within a day or two, after which half of their sessions go to it; every
  session's sub-categories move to others (the sub-categories ordered by popularity rotate by
  half), and within each sub-category the items' popularity ranks rotate by half. Users keep
  their tastes, and the new items have attributes and texts as the others do. Every event
  before day ``D`` is the unshifted shop's of the same seed (sessions begun before ``D`` end as
  they would have); the sessions from ``D`` on are replayed under the new regime, by a generator
  of their own, and the event count stays about the same.

Ids are ``"u000123"`` (users), ``"i00045"`` (items) and ``"s0000042"`` (sessions, numbered in
order of their first event); they widen for larger shops. The same seed gives identical tables
on every run, whatever the date (the window ends at a fixed ``end``, never at "now").

:func:`generate_shop_batches` generates the same kind of shop (the same catalogue) a batch of
users at a time, for shops larger than memory; :func:`write_demo_shop` with ``shards`` writes it
as Parquet shards by user (:mod:`tasks.data.shards`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from models.columns import (
    SESSION,
)
from models.errors import ConfigError
from tasks.data.demo_catalogue import (
    DAY,
    SECOND,
    Catalogue,
    build_catalogue,
    items_frame,
    launch_category,
    make_ids,
    taste_shift,
)
from tasks.data.demo_sessions import (
    P_BUY,
    P_CART,
    P_FAV,
    Shift,
    events_frame,
    plan_sessions,
    session_lengths,
    simulate,
    user_tastes,
    user_weights,
)
from tasks.data.shards import ShardWriter, check_shards

logger = logging.getLogger(__name__)

DEFAULT_END = dt.datetime(2025, 12, 31, tzinfo=dt.UTC)
_SHIFT_STREAM = 0x5F1F7  # first word of the seeds of everything a regime change draws
BATCH_USERS = 50_000  # users generated together by generate_shop_batches (about 2M events)


@dataclass(frozen=True)
class DemoShop:
    """Paths of the tables written by :func:`write_demo_shop`."""

    events: Path
    items: Path


def _check(n_events: int, seed: int, n_days: int, shift_day: int | None) -> None:
    """Raise :class:`ConfigError` for arguments the generator cannot honour."""
    limits = (("n_events", n_events, 500), ("n_days", n_days, 1), ("seed", seed, 0))
    bad = [f"{name}={value} (at least {low})" for name, value, low in limits if value < low]
    if bad:
        raise ConfigError(f"demo shop arguments out of range: {', '.join(bad)}. The generator "
                          "needs 500 or more events over one or more days and a non-negative "
                          "seed; pass values in range.")
    if shift_day is not None and not 0 < shift_day < n_days:
        allowed = (f"from 1 to {n_days - 1}" if n_days > 1 else
                   "none: a one-day shop has no later day; use two or more days")
        raise ConfigError(f"shift_day={shift_day} is outside the shop: the shift day is a day "
                          f"index counted from the shop's first day (0) and must lie strictly "
                          f"between 0 and n_days={n_days}, so the allowed days are {allowed}.")


@dataclass
class _Plan:
    """What every user of a shop shares: the window, the catalogue and the sizes."""

    window: tuple[int, int, int]  # first calendar day, start and end of the window (epoch µs)
    n_users: int
    n_views: int
    cat: Catalogue
    item_ids: pl.Series
    rng: np.random.Generator  # the shop's generator, after the catalogue
    seed: int
    shift: Shift | None = None  # the regime change, if any (its generator: see shift_for)
    shift_ids: pl.Series | None = None  # the ids of the catalogue after the shift

    def shift_for(self, batch: int) -> Shift | None:
        """The regime change, drawing from the shift generator of batch number ``batch``."""
        if self.shift is None:
            return None
        stream = np.random.default_rng([_SHIFT_STREAM, self.seed, 1 + batch])
        return dataclasses.replace(self.shift, rng=stream)

    def final(self) -> tuple[Catalogue, pl.Series]:
        """The catalogue of the events and items tables (the one after a shift), and its ids."""
        if self.shift is None or self.shift_ids is None:
            return self.cat, self.item_ids
        return self.shift.cat, self.shift_ids


def _plan(n_events: int, seed: int, n_days: int, end: dt.datetime,
          shift_day: int | None) -> _Plan:
    """Check the arguments, fix the window and build the catalogue (and the one after a shift)."""
    _check(n_events, seed, n_days, shift_day)
    end = end.replace(tzinfo=dt.UTC) if end.tzinfo is None else end.astimezone(dt.UTC)
    end_us = (end - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    lo_us = end_us - n_days * DAY
    rng = np.random.default_rng(seed)
    n_users, n_items = max(50, n_events // 40), max(100, n_events // 60)
    cat = build_catalogue(n_items, rng, n_days)
    consumable_share = cat.base[cat.consumable].sum()
    per_view = 1 + P_CART + P_FAV + P_CART * P_BUY * (1 + 1.2 * consumable_share)
    item_ids = make_ids("i", n_items, 5)
    plan = _Plan((lo_us - lo_us % DAY, lo_us, end_us), n_users, round(n_events / per_view), cat,
                 item_ids, rng, seed)
    if shift_day is not None:  # drawn by a generator of its own: the shop's draws are unchanged
        shift_rng = np.random.default_rng([_SHIFT_STREAM, seed, 0])
        after = launch_category(cat, shift_day, shift_rng)
        plan.shift = Shift(shift_day, after, taste_shift(cat), shift_rng)
        added = make_ids("i", len(after.leaf) - n_items, len(item_ids[0]) - 1, n_items)
        plan.shift_ids = pl.concat([item_ids, added])
    return plan


def generate_shop(n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                  end: dt.datetime = DEFAULT_END, shift_day: int | None = None
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate a synthetic shop's canonical tables.

    Args:
        n_events: Approximate number of events (the result is within a few percent).
        seed: Seed of the only random generator used: the same seed gives identical tables.
        n_days: Length of the window of events, in days.
        end: End of the window (exclusive); a naive datetime is read as UTC.
        shift_day: The day (counted from the window's first calendar day, 0) of a regime change
            (see the module docstring), from 1 to ``n_days - 1``; None for none. The events
            before it are those of the same shop without it, the new category's items are
            added to the items table.

    Returns:
        ``(events, items)`` with the canonical columns and dtypes of :mod:`models.columns`;
        events sorted by timestamp, items by item id.

    Raises:
        ConfigError: If ``n_events``, ``n_days``, ``seed`` or ``shift_day`` is out of range.
    """
    plan = _plan(n_events, seed, n_days, end, shift_day)
    cat, rng = plan.cat, plan.rng
    length = session_lengths(plan.n_views, rng)
    ses = plan_sessions(cat, length, user_weights(plan.n_users, rng), plan.window, rng,
                        user_tastes(seed, 0, plan.n_users))
    batches = simulate(cat, ses, plan.n_users, plan.window, rng, shift=plan.shift_for(0))
    final, item_ids = plan.final()
    events = events_frame(batches, final, item_ids, make_ids("u", plan.n_users, 6),
                           plan.window[2])
    logger.info("generated a demo shop: %d events, %d sessions, %d items, %d days to %s%s",
                events.height, len(ses.length), len(final.code), n_days, _iso(plan.window[2]),
                _shift_note(shift_day))
    return events, items_frame(final, item_ids)


def generate_shop_batches(n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                          end: dt.datetime = DEFAULT_END, batch_users: int = BATCH_USERS,
                          shift_day: int | None = None
                          ) -> tuple[pl.DataFrame, Iterator[pl.DataFrame]]:
    """Generate a synthetic shop's items, and its events a batch of users at a time.

    The shop has the catalogue and the statistical shape of :func:`generate_shop`'s, but each
    batch of ``batch_users`` users draws its sessions from a generator of its own, so the events
    differ from :func:`generate_shop`'s for the same seed. The same arguments give identical
    batches. Memory follows the batch (and the catalogue), not the number of events.
    ``shift_day`` adds the regime change of :func:`generate_shop` to every batch (each with a
    shift generator of its own): the events before it are the unshifted batches', but for the
    session ids of the batches after the first. Those are numbered after the sessions of the
    batches before them, whose number the shift changes, so they differ by a constant per batch.

    Returns:
        The items, sorted by item id, and an iterator over the events of each batch (canonical
        columns, sorted by timestamp within the batch; session ids numbered across batches).

    Raises:
        ConfigError: If ``n_events``, ``n_days``, ``seed`` or ``shift_day`` is out of range.
    """
    plan = _plan(n_events, seed, n_days, end, shift_day)
    final, item_ids = plan.final()
    weights = user_weights(plan.n_users, plan.rng)
    starts = range(0, plan.n_users, batch_users)
    streams = np.random.SeedSequence(seed).spawn(len(starts))

    def batches() -> Iterator[pl.DataFrame]:
        first_session = 0
        for number, (start, stream) in enumerate(zip(starts, streams, strict=True)):
            share = weights[start:start + batch_users]
            rng = np.random.default_rng(stream)
            length = session_lengths(round(plan.n_views * share.sum()), rng)
            if not len(length):
                continue
            ses = plan_sessions(plan.cat, length, share / share.sum(), plan.window, rng,
                                user_tastes(seed, start, start + len(share)))
            simulated = simulate(plan.cat, ses, len(share), plan.window, rng, by_day=True,
                                 shift=plan.shift_for(number))
            user_ids = make_ids("u", len(share), 6, start, plan.n_users)
            events = events_frame(simulated, final, item_ids, user_ids, plan.window[2],
                                   (first_session, max(7, len(str(n_events)))))
            first_session += events[SESSION].n_unique()
            yield events

    return items_frame(final, item_ids), batches()


def _iso(epoch_us: int) -> str:
    return dt.datetime.fromtimestamp(epoch_us / SECOND, dt.UTC).isoformat()


def _shift_note(shift_day: int | None) -> str:
    return "" if shift_day is None else f", regime change on day {shift_day}"


def write_demo_shop(out_dir: Path, n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                    end: dt.datetime = DEFAULT_END, shards: int | None = None,
                    batch_users: int = BATCH_USERS, shift_day: int | None = None) -> DemoShop:
    """Generate a shop and write it as Parquet under ``out_dir``.

    Without ``shards``, :func:`generate_shop` writes ``events.parquet``. With ``shards``,
    :func:`generate_shop_batches` writes the events a batch of users at a time into ``events/``,
    partitioned by user into ``shards`` files (:mod:`tasks.data.shards`), in memory bounded by a
    batch of ``batch_users`` users. ``shift_day`` adds a regime change on that day (see
    :func:`generate_shop`).

    Returns:
        The paths of the events (file or folder of shards) and of ``<out_dir>/items.parquet``.

    Raises:
        ConfigError: If the arguments are out of range or ``out_dir`` cannot be written.
    """
    if shards is not None:
        check_shards(shards)
    out_dir = Path(out_dir)
    shop = DemoShop(events=out_dir / ("events.parquet" if shards is None else "events"),
                    items=out_dir / "items.parquet")
    try:
        if shards is None:
            events, items = generate_shop(n_events=n_events, seed=seed, n_days=n_days, end=end,
                                          shift_day=shift_day)
            out_dir.mkdir(parents=True, exist_ok=True)
            events.write_parquet(shop.events)
        else:
            items, batches = generate_shop_batches(n_events, seed, n_days, end, batch_users,
                                                   shift_day)
            with ShardWriter(shop.events, shards) as writer:
                for events in batches:
                    writer.write(events)
        items.write_parquet(shop.items)
    except OSError as exc:
        raise ConfigError(f"cannot write the demo shop to {out_dir}: {exc}. Choose a folder you "
                          "can write to, with room for the Parquet files.") from exc
    logger.info("wrote %s and %s", shop.events, shop.items)
    return shop
