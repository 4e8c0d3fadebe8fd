"""A seeded synthetic online shop: the sample data shoprank ships with.

:func:`generate_shop` returns the canonical ``events`` and ``items`` tables (see
:mod:`models.columns`) of a store whose behaviour has the structure recommenders learn from:

* **Catalogue**: eight top-level categories (grocery, beauty and pets are consumable), each with
  sub-categories. ``category_id`` is the path ``"c<top>/c<top>.<sub>"``, e.g. ``"c4/c4.2"`` is the
  third sub-category of electronics; the part before ``/`` is the top-level category. Brands
  belong to one top-level category; prices are log-normal around a level per sub-category;
  titles read ``"<Brand> <sub-category name> item <number>"``.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from models.columns import (
    BRAND,
    CATEGORY,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    PRICE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    TITLE,
    USER,
)
from models.errors import ConfigError
from tasks.data.shards import ShardWriter, check_shards

logger = logging.getLogger(__name__)

DEFAULT_END = dt.datetime(2025, 12, 31, tzinfo=dt.UTC)

_S = 1_000_000  # microseconds per second
_DAY = 86_400 * _S
_VIEW, _CART, _FAV, _PURCHASE = (EVENT_TYPES.index(t) for t in ("view", "cart", "fav", "purchase"))

# Top-level categories: name, typical price, sub-category nouns. The first three are consumable.
_TOPS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("grocery", 4.0, ("coffee", "tea", "pasta", "snacks", "sauce", "cereal")),
    ("beauty", 14.0, ("shampoo", "lotion", "soap", "perfume", "lipstick", "razor")),
    ("pets", 11.0, ("dog food", "cat food", "litter", "treats", "leash", "chew toy")),
    ("home", 32.0, ("lamp", "pillow", "towel", "vase", "rug", "mug")),
    ("electronics", 110.0, ("headphones", "charger", "speaker", "camera", "keyboard", "monitor")),
    ("fashion", 38.0, ("shirt", "jeans", "sneakers", "jacket", "dress", "scarf")),
    ("sports", 42.0, ("yoga mat", "dumbbell", "bottle", "racket", "helmet", "ball")),
    ("toys", 24.0, ("puzzle", "blocks", "doll", "board game", "kite", "robot")),
)
_N_TOPS = len(_TOPS)
_N_CONSUMABLE = 3
_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "no", "ti", "sa", "du", "fe",
              "xo", "pi", "ze", "mo", "ru", "la", "bri", "qua", "ny", "tor")

# Sessions per hour of the day (UTC is the shop's clock) and per weekday (Monday first).
_HOURLY = np.array([0.45, 0.28, 0.18, 0.12, 0.10, 0.12, 0.22, 0.40, 0.60, 0.75, 0.85, 0.95,
                    1.05, 1.00, 0.95, 0.95, 1.00, 1.10, 1.30, 1.55, 1.75, 1.80, 1.45, 0.90])
_WEEKDAY = np.array([0.92, 0.90, 0.93, 0.97, 1.05, 1.30, 1.35])

_P_CART, _P_FAV, _P_BUY = 0.07, 0.025, 0.40  # per view, per view, per cart
_P_REBUY, _REBUY_ROUNDS = 0.5, 6
_MEAN_VIEWS, _MAX_VIEWS = 5.0, 40  # views per session
# Next view of a session: complement of the previous item, same sub-category, same item again;
# otherwise the session's other sub-category.
_P_COMPLEMENT, _P_SAME_LEAF, _P_REVIEW = 0.25, 0.55, 0.05
_CACHE_CELLS = 30_000_000  # largest (days x items) popularity table kept in memory
BATCH_USERS = 50_000  # users generated together by generate_shop_batches (about 2M events)


@dataclass(frozen=True)
class DemoShop:
    """Paths of the tables written by :func:`write_demo_shop`."""

    events: Path
    items: Path


@dataclass
class _Catalogue:
    """Items stored grouped by sub-category (leaf); one array entry per item unless noted."""

    leaf: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    base: np.ndarray  # Zipf popularity
    launch: np.ndarray  # launch day, relative to the first calendar day of the window
    peak: np.ndarray  # days from launch to peak popularity
    floor: np.ndarray  # share of the popularity kept long after the peak
    complement: np.ndarray  # index of the item often viewed next
    code: np.ndarray  # public item number
    leaf_start: np.ndarray  # per leaf, plus one: first item index of each leaf
    related: np.ndarray  # per leaf: the leaf its sessions and complements drift to
    rebuy_days: np.ndarray  # per leaf: typical days between two purchases of a consumable
    _cums: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def consumable(self) -> np.ndarray:
        """Whether each item belongs to a consumable top-level category."""
        return self.leaf % _N_TOPS < _N_CONSUMABLE

    def cumulative(self, day: int) -> np.ndarray:
        """Return the running sum over items of their popularity on ``day`` (0 before launch)."""
        if day in self._cums:
            return self._cums[day]
        age = day + 0.5 - self.launch
        x = np.clip(age, 0.0, None) / self.peak
        curve = self.floor + (1.0 - self.floor) * x * np.exp(1.0 - x)
        cum = np.cumsum(np.where(age >= 0, self.base * curve, 0.0))
        if (len(self._cums) + 1) * len(cum) <= _CACHE_CELLS:
            self._cums[day] = cum
        return cum

    def forget(self) -> None:
        """Drop the cached popularity of every day."""
        self._cums.clear()

    def draw(self, leaf: np.ndarray, day: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per query from ``leaf``, weighted by each item's popularity on ``day``."""
        u = rng.random(len(leaf))
        out = np.empty(len(leaf), dtype=np.int64)
        order = np.argsort(day, kind="stable")
        days, first = np.unique(day[order], return_index=True)
        bounds = np.append(first, len(order))
        for d, a, b in zip(days, bounds[:-1], bounds[1:], strict=True):
            sel = order[a:b]
            out[sel] = _pick(self.cumulative(int(d)), self.leaf_start, leaf[sel], u[sel])
        return out


@dataclass
class _Batch:
    """Events as integer codes; ``kind`` indexes :data:`EVENT_TYPES`, ``ts`` is epoch µs."""

    user: np.ndarray
    item: np.ndarray
    kind: np.ndarray
    ts: np.ndarray
    session: np.ndarray
    qty: np.ndarray

    def take(self, mask: np.ndarray) -> _Batch:
        """Select events by a boolean mask or an index array."""
        return _Batch(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    @classmethod
    def concat(cls, parts: list[_Batch]) -> _Batch:
        """The events of ``parts``, one after the other."""
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)))

    def derive(self, kind: int, ts: np.ndarray, qty: np.ndarray | None = None) -> _Batch:
        """Events of the same users, items and sessions with another type and time."""
        kinds = np.full(len(ts), kind, dtype=np.int8)
        return dataclasses.replace(self, kind=kinds, ts=ts, qty=self.qty if qty is None else qty)


@dataclass
class _Sessions:
    """One entry per session, sorted by start time."""

    user: np.ndarray
    day: np.ndarray  # calendar day of the window the session starts on
    start: np.ndarray  # epoch µs
    primary: np.ndarray  # leaf the session starts in
    secondary: np.ndarray  # the other leaf it visits (equal to primary for one-leaf sessions)
    length: np.ndarray  # number of views

    def slice(self, start: int, stop: int) -> _Sessions:
        """Sessions ``start .. stop-1``."""
        return _Sessions(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


def _zipf(n: int, exponent: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-Mandelbrot weights ``(rank + offset) ** -exponent`` in random order, summing to 1."""
    w = (np.arange(1, n + 1) + offset) ** -exponent
    return rng.permutation(w / w.sum())


def _pick(cum: np.ndarray, leaf_start: np.ndarray, leaf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw within each query's leaf segment of the running sum ``cum``."""
    lo, hi = leaf_start[leaf], leaf_start[leaf + 1]
    before = np.where(lo > 0, cum[lo - 1], 0.0)
    target = before + u * (cum[hi - 1] - before)
    return np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)


def _time_of_day(n: int, rng: np.random.Generator) -> np.ndarray:
    """Offsets into a day in µs, following the hourly rhythm."""
    hour = rng.choice(24, size=n, p=_HOURLY / _HOURLY.sum())
    return hour * 3600 * _S + rng.integers(0, 3600 * _S, size=n)


def _seconds(rng: np.random.Generator, low: float, mean: float, n: int) -> np.ndarray:
    """Delays of ``low`` plus an exponential with ``mean`` seconds, in µs."""
    return ((low + rng.exponential(mean, n)) * _S).astype(np.int64)


def _build_catalogue(n_items: int, rng: np.random.Generator, n_days: int) -> _Catalogue:
    """Items with sub-categories, brands, prices, popularity curves and complements."""
    n_leaves = int(np.clip(n_items // 40, 2 * _N_TOPS, 400))
    size_w = rng.lognormal(0.0, 0.6, n_leaves)
    extra = rng.choice(n_leaves, n_items - n_leaves, p=size_w / size_w.sum())
    leaf = np.sort(np.concatenate([np.arange(n_leaves), extra]))
    leaf_start = np.searchsorted(leaf, np.arange(n_leaves + 1))
    top = leaf % _N_TOPS
    per_top = int(np.clip(n_items // 240, 3, 600))
    brand = rng.choice(per_top, n_items, p=_zipf(per_top, 1.0, 1.0, rng)) * _N_TOPS + top
    level = np.log([t[1] for t in _TOPS])[np.arange(n_leaves) % _N_TOPS]
    level = level + rng.normal(0.0, 0.4, n_leaves)
    brand_factor = rng.lognormal(0.0, 0.25, per_top * _N_TOPS)[brand]
    price = np.exp(level[leaf] + rng.normal(0.0, 0.45, n_items)) * brand_factor
    base = _zipf(n_items, 1.05, 2.0, rng)
    launch = rng.uniform(-n_days, n_days, n_items)
    floor = rng.uniform(0.01, 0.15, n_items)
    staple = leaf_start[:-1] + rng.integers(0, np.diff(leaf_start))  # an evergreen item per leaf
    launch[staple], floor[staple] = -1e9, 1.0
    related = (np.arange(n_leaves) + rng.integers(1, n_leaves, n_leaves)) % n_leaves
    target = np.where(rng.random(n_items) < 0.5, leaf, related[leaf])
    complement = _pick(np.cumsum(base), leaf_start, target, rng.random(n_items))
    return _Catalogue(
        leaf=leaf, brand=brand, price=np.maximum(np.round(price, 2), 0.49), base=base,
        launch=launch, peak=rng.lognormal(np.log(5.0), 0.5, n_items), floor=floor,
        complement=complement, code=rng.permutation(n_items), leaf_start=leaf_start,
        related=related, rebuy_days=rng.uniform(6.0, 30.0, n_leaves),
    )


def _ids(prefix: str, n: int, min_width: int, start: int = 0, total: int | None = None
         ) -> pl.Series:
    """``prefix`` and the numbers ``start .. start+n-1``, zero-padded as wide as ``total - 1``.

    ``total`` defaults to ``start + n``: the ids of a slice of ``total`` ids have their width.
    """
    width = max(min_width, len(str(max((total or start + n) - 1, 0))))
    number = pl.int_range(start, start + n, eager=True).cast(pl.String).str.zfill(width)
    return prefix + number


def _items_frame(cat: _Catalogue, item_ids: pl.Series) -> pl.DataFrame:
    """Build the canonical items table, sorted by ``item_id``."""
    n_leaves = len(cat.related)
    tops, subs = np.arange(n_leaves) % _N_TOPS, np.arange(n_leaves) // _N_TOPS
    nouns = [_TOPS[t][2][k % 6] + (f" {k // 6 + 1}" if k >= 6 else "") for t, k in zip(
        tops, subs, strict=True)]
    syl = _SYLLABLES
    n_brands = int(cat.brand.max()) + 1
    brands = [syl[b % 20].title() + syl[b // 20 % 20] + (syl[b // 400 - 1] if b >= 400 else "")
              for b in range(n_brands)]
    frame = pl.DataFrame({
        ITEM: item_ids.gather(cat.code),
        CATEGORY: pl.Series([f"c{t}/c{t}.{k}" for t, k in zip(tops, subs, strict=True)]).gather(
            cat.leaf),
        BRAND: pl.Series(brands).gather(cat.brand),
        PRICE: cat.price.astype(np.float64),
        "noun": pl.Series(nouns).gather(cat.leaf),
        "code": cat.code,
    })
    title = pl.format("{} {} item {}", pl.col(BRAND), pl.col("noun"), pl.col("code"))
    return frame.with_columns(title.alias(TITLE)).drop("noun", "code").sort(ITEM)


def _session_starts(n: int, first_day_us: int, lo_us: int, hi_us: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Calendar day index and start (epoch µs) of ``n`` sessions inside ``[lo_us, hi_us)``."""
    n_cal = -(-(hi_us - first_day_us) // _DAY)
    weekday0 = dt.datetime.fromtimestamp(first_day_us / _S, dt.UTC).weekday()
    d = np.arange(n_cal)
    w = _WEEKDAY[(weekday0 + d) % 7] * (1.0 + 0.2 * d / n_cal) * rng.lognormal(0, 0.08, n_cal)
    day = rng.choice(n_cal, size=n, p=w / w.sum())
    # Starts in the partial first or last calendar day wrap to the other end at the same hour.
    start = first_day_us + day * _DAY + _time_of_day(n, rng)
    start = np.sort(lo_us + (start - lo_us) % (hi_us - lo_us))
    return (start - first_day_us) // _DAY, start


def _session_lengths(n_views: int, rng: np.random.Generator) -> np.ndarray:
    """Draw geometric views per session (at most ``_MAX_VIEWS``) adding up to ``n_views``."""
    starts = rng.random(n_views) < 1.0 / _MEAN_VIEWS
    starts[::_MAX_VIEWS] = True
    return np.diff(np.append(np.flatnonzero(starts), n_views))


def _user_weights(n_users: int, rng: np.random.Generator) -> np.ndarray:
    """Each user's share of the sessions: Zipf-like, in random order."""
    return _zipf(n_users, 1.0, 0.01 * n_users + 5.0, rng)


def _plan_sessions(cat: _Catalogue, length: np.ndarray, weights: np.ndarray,
                   window: tuple[int, int, int], rng: np.random.Generator) -> _Sessions:
    """Who (an index into ``weights``, which sum to 1) shops when, in which sub-categories."""
    n, n_users = len(length), len(weights)
    user = rng.choice(n_users, n, p=weights)
    leaf_pop = np.add.reduceat(cat.base, cat.leaf_start[:-1])
    leaf_pop = leaf_pop / leaf_pop.sum()
    home = rng.choice(len(leaf_pop), (n_users, 2), p=leaf_pop)
    own = home[user, (rng.random(n) < 0.35).astype(np.int64)]
    primary = np.where(rng.random(n) < 0.7, own, rng.choice(len(leaf_pop), n, p=leaf_pop))
    secondary = np.where(rng.random(n) < 0.35, cat.related[primary], primary)
    day, start = _session_starts(n, *window, rng)
    return _Sessions(user.astype(np.int32), day, start, primary, secondary, length)


def _next_items(cat: _Catalogue, ses: _Sessions, s: np.ndarray, prev: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Choose the item viewed after ``prev`` in each session of ``s``."""
    r = rng.random(len(s))
    day = ses.day[s]
    comp = cat.complement[prev]
    use_comp = (r < _P_COMPLEMENT) & (cat.launch[comp] <= day + 0.5)
    stay = _P_COMPLEMENT + _P_SAME_LEAF
    review = (r >= stay) & (r < stay + _P_REVIEW)
    here = cat.leaf[prev]
    other = np.where(here == ses.primary[s], ses.secondary[s], ses.primary[s])
    leaf = np.where(r >= stay + _P_REVIEW, other, here)
    draw = ~(use_comp | review)
    out = np.where(use_comp, comp, prev)
    out[draw] = cat.draw(leaf[draw], day[draw], rng)
    again = draw & (out == prev)  # a second try makes immediate repeats rarer
    out[again] = cat.draw(leaf[again], day[again], rng)
    return out


def _session_views(cat: _Catalogue, ses: _Sessions, rng: np.random.Generator) -> _Batch:
    """All views, session by session, built one position at a time across every session."""
    offsets = np.cumsum(ses.length) - ses.length
    n = int(ses.length.sum())
    item = np.empty(n, dtype=np.int32)
    ts = np.empty(n, dtype=np.int64)
    item[offsets] = cat.draw(ses.primary, ses.day, rng)
    ts[offsets] = ses.start
    for t in range(1, int(ses.length.max())):
        s = np.flatnonzero(ses.length > t)
        at = offsets[s] + t
        item[at] = _next_items(cat, ses, s, item[at - 1], rng)
        ts[at] = ts[at - 1] + (rng.lognormal(np.log(25.0), 0.9, len(s)) * _S).astype(np.int64)
    session = np.repeat(np.arange(len(ses.length), dtype=np.int32), ses.length)
    kind = np.full(n, _VIEW, dtype=np.int8)
    return _Batch(ses.user[session], item, kind, ts, session, np.ones(n, dtype=np.int16))


def _views_day_by_day(cat: _Catalogue, ses: _Sessions, rng: np.random.Generator) -> _Batch:
    """:func:`_session_views` for the sessions of one calendar day at a time.

    Only that day's popularity is kept (:meth:`_Catalogue.forget`), so memory follows the
    catalogue, not the catalogue times the days.
    """
    bounds = np.flatnonzero(np.diff(ses.day, prepend=-1, append=ses.day[-1] + 1))
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = _session_views(cat, ses.slice(start, stop), rng)
        part.session += start
        parts.append(part)
        cat.forget()
    return _Batch.concat(parts)


def _quantities(cat: _Catalogue, item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Units bought: consumables often several, other items mostly one."""
    several = 1 + np.minimum(rng.poisson(0.7, len(item)), 5)
    pair = 1 + (rng.random(len(item)) < 0.06)
    return np.where(cat.consumable[item], several, pair).astype(np.int16)


def _funnel(cat: _Catalogue, views: _Batch, session_end: np.ndarray, propensity: np.ndarray,
            rng: np.random.Generator) -> list[_Batch]:
    """Carts and favourites after views; purchases of carted items at the end of the session."""
    n = len(views.ts)
    p_cart = np.minimum(_P_CART * propensity[views.user], 0.5)
    carts = views.take(rng.random(n) < p_cart)
    carts = carts.derive(_CART, carts.ts + _seconds(rng, 5.0, 40.0, len(carts.ts)))
    favs = views.take(rng.random(n) < _P_FAV)
    favs = favs.derive(_FAV, favs.ts + _seconds(rng, 2.0, 20.0, len(favs.ts)))
    buys = carts.take(rng.random(len(carts.ts)) < _P_BUY)
    checkout = np.maximum(buys.ts, session_end[buys.session])
    buy_ts = checkout + _seconds(rng, 20.0, 150.0, len(buys.ts))
    return [carts, favs, buys.derive(_PURCHASE, buy_ts, _quantities(cat, buys.item, rng))]


def _rebuys(cat: _Catalogue, purchases: _Batch, next_session: int, first_day_us: int,
            end_us: int, rng: np.random.Generator) -> list[_Batch]:
    """Short view-cart-purchase sessions in which users buy their consumables again."""
    out: list[_Batch] = []
    src = purchases.take(cat.consumable[purchases.item])
    for _ in range(_REBUY_ROUNDS):
        src = src.take(rng.random(len(src.ts)) < _P_REBUY)
        n = len(src.ts)
        gap = cat.rebuy_days[cat.leaf[src.item]] * rng.lognormal(0.0, 0.25, n) * _DAY
        day = (src.ts + gap.astype(np.int64) - first_day_us) // _DAY
        view = src.derive(_VIEW, first_day_us + day * _DAY + _time_of_day(n, rng),
                          np.ones(n, dtype=np.int16))
        view.session = next_session + np.arange(n, dtype=np.int32)
        cart = view.derive(_CART, view.ts + _seconds(rng, 5.0, 40.0, n))
        buy = cart.derive(_PURCHASE, cart.ts + _seconds(rng, 20.0, 150.0, n),
                          _quantities(cat, src.item, rng))
        keep = buy.ts < end_us
        out += [b.take(keep) for b in (view, cart, buy)]
        src, next_session = buy.take(keep), next_session + n
        if not len(src.ts):
            break
    return out


def _events_frame(batches: list[_Batch], cat: _Catalogue, item_ids: pl.Series,
                  user_ids: pl.Series, end_us: int, sessions: tuple[int, int] = (0, 7)
                  ) -> pl.DataFrame:
    """Build the canonical events table sorted by time, sessions numbered in time order.

    ``user_ids`` are the ids of the user indices of ``batches``; ``sessions`` is the first
    session number and the least width of the session ids.
    """
    ts = np.concatenate([b.ts for b in batches])
    idx = np.flatnonzero(ts < end_us)
    idx = idx[np.argsort(ts[idx], kind="stable")]

    def column(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in batches])[idx]

    session = column("session")
    uniq, first = np.unique(session, return_index=True)
    number = np.empty(int(uniq[-1]) + 1, dtype=np.int64)
    number[uniq[np.argsort(first)]] = np.arange(len(uniq))
    item = column("item")
    return pl.DataFrame({
        USER: user_ids.gather(column("user")),
        ITEM: item_ids.gather(cat.code[item]),
        EVENT_TYPE: pl.Series(EVENT_TYPES).gather(column("kind")),
        TIMESTAMP: pl.Series(ts[idx]).cast(pl.Datetime("us", "UTC")),
        SESSION: _ids("s", len(uniq), sessions[1], sessions[0]).gather(number[session]),
        PRICE: cat.price[item].astype(np.float64),
        QUANTITY: column("qty").astype(np.int64),
    })


def _check(n_events: int, seed: int, n_days: int) -> None:
    """Raise :class:`ConfigError` for arguments the generator cannot honour."""
    limits = (("n_events", n_events, 500), ("n_days", n_days, 1), ("seed", seed, 0))
    bad = [f"{name}={value} (at least {low})" for name, value, low in limits if value < low]
    if bad:
        raise ConfigError(f"demo shop arguments out of range: {', '.join(bad)}. The generator "
                          "needs 500 or more events over one or more days and a non-negative "
                          "seed; pass values in range.")


@dataclass
class _Plan:
    """What every user of a shop shares: the window, the catalogue and the sizes."""

    window: tuple[int, int, int]  # first calendar day, start and end of the window (epoch µs)
    n_users: int
    n_views: int
    cat: _Catalogue
    item_ids: pl.Series
    rng: np.random.Generator  # the shop's generator, after the catalogue


def _plan(n_events: int, seed: int, n_days: int, end: dt.datetime) -> _Plan:
    """Check the arguments, fix the window and build the catalogue."""
    _check(n_events, seed, n_days)
    end = end.replace(tzinfo=dt.UTC) if end.tzinfo is None else end.astimezone(dt.UTC)
    end_us = (end - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    lo_us = end_us - n_days * _DAY
    rng = np.random.default_rng(seed)
    n_users, n_items = max(50, n_events // 40), max(100, n_events // 60)
    cat = _build_catalogue(n_items, rng, n_days)
    consumable_share = cat.base[cat.consumable].sum()
    per_view = 1 + _P_CART + _P_FAV + _P_CART * _P_BUY * (1 + 1.2 * consumable_share)
    return _Plan((lo_us - lo_us % _DAY, lo_us, end_us), n_users, round(n_events / per_view), cat,
                 _ids("i", n_items, 5), rng)


def _simulate(cat: _Catalogue, ses: _Sessions, n_users: int, window: tuple[int, int, int],
              rng: np.random.Generator, by_day: bool = False) -> list[_Batch]:
    """Views, the funnel after them and the rebuys of the planned sessions of ``n_users``.

    With ``by_day`` the views are drawn one calendar day at a time (:func:`_views_day_by_day`).
    """
    views = (_views_day_by_day if by_day else _session_views)(cat, ses, rng)
    propensity = rng.lognormal(0.0, 0.35, n_users)
    propensity /= propensity[ses.user].mean()
    session_end = views.ts[np.cumsum(ses.length) - 1]
    batches = [views, *_funnel(cat, views, session_end, propensity, rng)]
    return batches + _rebuys(cat, batches[-1], len(ses.length), window[0], window[2], rng)


def generate_shop(n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                  end: dt.datetime = DEFAULT_END) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate a synthetic shop's canonical tables.

    Args:
        n_events: Approximate number of events (the result is within a few percent).
        seed: Seed of the only random generator used: the same seed gives identical tables.
        n_days: Length of the window of events, in days.
        end: End of the window (exclusive); a naive datetime is read as UTC.

    Returns:
        ``(events, items)`` with the canonical columns and dtypes of :mod:`models.columns`;
        events sorted by timestamp, items by item id.

    Raises:
        ConfigError: If ``n_events``, ``n_days`` or ``seed`` is out of range.
    """
    plan = _plan(n_events, seed, n_days, end)
    cat, rng = plan.cat, plan.rng
    length = _session_lengths(plan.n_views, rng)
    ses = _plan_sessions(cat, length, _user_weights(plan.n_users, rng), plan.window, rng)
    batches = _simulate(cat, ses, plan.n_users, plan.window, rng)
    events = _events_frame(batches, cat, plan.item_ids, _ids("u", plan.n_users, 6),
                           plan.window[2])
    logger.info("generated a demo shop: %d events, %d sessions, %d items, %d days to %s",
                events.height, len(ses.length), len(cat.code), n_days, _iso(plan.window[2]))
    return events, _items_frame(cat, plan.item_ids)


def generate_shop_batches(n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                          end: dt.datetime = DEFAULT_END, batch_users: int = BATCH_USERS
                          ) -> tuple[pl.DataFrame, Iterator[pl.DataFrame]]:
    """Generate a synthetic shop's items, and its events a batch of users at a time.

    The shop has the catalogue and the statistical shape of :func:`generate_shop`'s, but each
    batch of ``batch_users`` users draws its sessions from a generator of its own, so the events
    differ from :func:`generate_shop`'s for the same seed. The same arguments give identical
    batches. Memory follows the batch (and the catalogue), not the number of events.

    Returns:
        The items, sorted by item id, and an iterator over the events of each batch (canonical
        columns, sorted by timestamp within the batch; session ids numbered across batches).

    Raises:
        ConfigError: If ``n_events``, ``n_days`` or ``seed`` is out of range.
    """
    plan = _plan(n_events, seed, n_days, end)
    weights = _user_weights(plan.n_users, plan.rng)
    starts = range(0, plan.n_users, batch_users)
    streams = np.random.SeedSequence(seed).spawn(len(starts))

    def batches() -> Iterator[pl.DataFrame]:
        first_session = 0
        for start, stream in zip(starts, streams, strict=True):
            share = weights[start:start + batch_users]
            rng = np.random.default_rng(stream)
            length = _session_lengths(round(plan.n_views * share.sum()), rng)
            if not len(length):
                continue
            ses = _plan_sessions(plan.cat, length, share / share.sum(), plan.window, rng)
            simulated = _simulate(plan.cat, ses, len(share), plan.window, rng, by_day=True)
            user_ids = _ids("u", len(share), 6, start, plan.n_users)
            events = _events_frame(simulated, plan.cat, plan.item_ids, user_ids, plan.window[2],
                                   (first_session, max(7, len(str(n_events)))))
            first_session += events[SESSION].n_unique()
            yield events

    return _items_frame(plan.cat, plan.item_ids), batches()


def _iso(epoch_us: int) -> str:
    return dt.datetime.fromtimestamp(epoch_us / _S, dt.UTC).isoformat()


def write_demo_shop(out_dir: Path, n_events: int = 200_000, seed: int = 0, n_days: int = 60,
                    end: dt.datetime = DEFAULT_END, shards: int | None = None,
                    batch_users: int = BATCH_USERS) -> DemoShop:
    """Generate a shop and write it as Parquet under ``out_dir``.

    Without ``shards``, :func:`generate_shop` writes ``events.parquet``. With ``shards``,
    :func:`generate_shop_batches` writes the events a batch of users at a time into ``events/``,
    partitioned by user into ``shards`` files (:mod:`tasks.data.shards`), in memory bounded by a
    batch of ``batch_users`` users.

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
            events, items = generate_shop(n_events=n_events, seed=seed, n_days=n_days, end=end)
            out_dir.mkdir(parents=True, exist_ok=True)
            events.write_parquet(shop.events)
        else:
            items, batches = generate_shop_batches(n_events, seed, n_days, end, batch_users)
            with ShardWriter(shop.events, shards) as writer:
                for events in batches:
                    writer.write(events)
        items.write_parquet(shop.items)
    except OSError as exc:
        raise ConfigError(f"cannot write the demo shop to {out_dir}: {exc}. Choose a folder you "
                          "can write to, with room for the Parquet files.") from exc
    logger.info("wrote %s and %s", shop.events, shop.items)
    return shop
