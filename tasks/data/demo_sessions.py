"""The demo shop's behaviour: tastes, sessions, the views within them, the funnel and rebuys.

Each user prefers one or two styles and one or two colours (:func:`user_tastes`). Sessions start
more often in the evening and at weekends; each follows one sub-category, sometimes a second
one, and carries one of its user's styles and colours; its next view is often the previous
item's complement, the same sub-category or the same item again. A draw within a sub-category
keeps to the items of the session's style most of the time, and often to its colour as well
(:meth:`Catalogue.draw`). About 7% of views lead to a cart, 40% of carts to a purchase at the
session's end, 2.5% of views to a favourite; consumables are bought again after a few weeks (see
:mod:`tasks.data.demo_data`). A :class:`Shift` replays the sessions from its day on under a new
regime: a launched category that most shoppers adopt, and sessions moved between sub-categories
(each user keeps their styles and colours).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np
import polars as pl

from models.columns import (
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    PRICE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    USER,
)
from tasks.data.demo_catalogue import (
    DAY,
    N_COLOURS,
    N_STYLES,
    SECOND,
    Catalogue,
    leaf_runs,
    make_ids,
    zipf,
)

_VIEW, _CART, _FAV, _PURCHASE = (EVENT_TYPES.index(t) for t in ("view", "cart", "fav", "purchase"))
# Sessions per hour of the day (UTC is the shop's clock) and per weekday (Monday first).
_HOURLY = np.array([0.45, 0.28, 0.18, 0.12, 0.10, 0.12, 0.22, 0.40, 0.60, 0.75, 0.85, 0.95,
                    1.05, 1.00, 0.95, 0.95, 1.00, 1.10, 1.30, 1.55, 1.75, 1.80, 1.45, 0.90])
_WEEKDAY = np.array([0.92, 0.90, 0.93, 0.97, 1.05, 1.30, 1.35])
P_CART, P_FAV, P_BUY = 0.07, 0.025, 0.40  # per view, per view, per cart
_P_REBUY, _REBUY_ROUNDS = 0.5, 6
_MEAN_VIEWS, _MAX_VIEWS = 5.0, 40  # views per session
# Next view of a session: complement of the previous item, same sub-category, same item again;
# otherwise the session's other sub-category.
_P_COMPLEMENT, _P_SAME_LEAF, _P_REVIEW = 0.25, 0.55, 0.05
# A draw within a sub-category keeps to the session's style with chance _P_STYLE, and of those
# draws a share _P_COLOUR keeps to its colour too. A user prefers one style (else two) with
# chance _P_ONE_TASTE, and, drawn apart, one colour (else two).
_P_STYLE, _P_COLOUR, _P_ONE_TASTE = 0.6, 0.5, 0.5
_TASTE_STREAM = 0x7A57E  # first word of the seeds of the users' tastes
_TASTE_BLOCK = 65_536  # users whose tastes one generator draws
# After a shift: the share of users who adopt the launched category, the chance an adopter's
# adoption day is the shift day (then each next day, geometrically) and the share of an
# adopter's sessions spent in it from then on.
_ADOPTERS, _P_ADOPT_DAY, _P_LAUNCHED = 0.6, 0.6, 0.5


@dataclass
class Batch:
    """Events as integer codes; ``kind`` indexes :data:`EVENT_TYPES`, ``ts`` is epoch µs."""

    user: np.ndarray
    item: np.ndarray
    kind: np.ndarray
    ts: np.ndarray
    session: np.ndarray
    qty: np.ndarray

    def take(self, mask: np.ndarray) -> Batch:
        """Select events by a boolean mask or an index array."""
        return Batch(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    @classmethod
    def concat(cls, parts: list[Batch]) -> Batch:
        """The events of ``parts``, one after the other."""
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)))

    def derive(self, kind: int, ts: np.ndarray, qty: np.ndarray | None = None) -> Batch:
        """Events of the same users, items and sessions with another type and time."""
        kinds = np.full(len(ts), kind, dtype=np.int8)
        return dataclasses.replace(self, kind=kinds, ts=ts, qty=self.qty if qty is None else qty)


@dataclass
class Tastes:
    """Per user, two preferred styles and two colours (equal when the user prefers one)."""

    style: np.ndarray  # (users, 2), indices into the styles of demo_catalogue.WORDS
    colour: np.ndarray  # (users, 2)


@dataclass
class Sessions:
    """One entry per session, sorted by start time."""

    user: np.ndarray
    day: np.ndarray  # calendar day of the window the session starts on
    start: np.ndarray  # epoch µs
    primary: np.ndarray  # leaf the session starts in
    secondary: np.ndarray  # the other leaf it visits (equal to primary for one-leaf sessions)
    length: np.ndarray  # number of views
    taste: np.ndarray  # (session, 3): the runs of a leaf its draws keep to (leaf_runs)

    def slice(self, start: int, stop: int) -> Sessions:
        """Sessions ``start .. stop-1``."""
        return Sessions(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


@dataclass
class Shift:
    """A regime change on calendar day ``day`` of the window (see :func:`simulate`)."""

    day: int
    cat: Catalogue  # the catalogue from ``day`` on (demo_catalogue.launch_category)
    taste: np.ndarray  # per leaf before the shift, the leaf its shoppers turn to after it
    rng: np.random.Generator  # draws everything after the shift, apart from the shop's own

    def sessions(self, ses: Sessions, n_users: int) -> Sessions:
        """``ses`` (all on or after the shift day) moved to the leaves of the new regime."""
        rng, n = self.rng, len(ses.length)
        never = np.iinfo(np.int64).max
        adopts = np.where(rng.random(n_users) < _ADOPTERS,  # the day each user adopts, if ever
                          self.day - 1 + rng.geometric(_P_ADOPT_DAY, n_users), never)
        launched = np.arange(len(self.taste), len(self.cat.related))
        weight = np.add.reduceat(self.cat.base, self.cat.leaf_start[:-1])[launched]
        new = (adopts[ses.user] <= ses.day) & (rng.random(n) < _P_LAUNCHED)
        leaf = launched[rng.choice(len(launched), n, p=weight / weight.sum())]
        primary = np.where(new, leaf, self.taste[ses.primary])
        secondary = np.where(ses.secondary == ses.primary, primary, self.cat.related[primary])
        return dataclasses.replace(ses, primary=primary, secondary=secondary)


def _time_of_day(n: int, rng: np.random.Generator) -> np.ndarray:
    """Offsets into a day in µs, following the hourly rhythm."""
    hour = rng.choice(24, size=n, p=_HOURLY / _HOURLY.sum())
    return hour * 3600 * SECOND + rng.integers(0, 3600 * SECOND, size=n)


def _seconds(rng: np.random.Generator, low: float, mean: float, n: int) -> np.ndarray:
    """Delays of ``low`` plus an exponential with ``mean`` seconds, in µs."""
    return ((low + rng.exponential(mean, n)) * SECOND).astype(np.int64)


def session_starts(n: int, first_day_us: int, lo_us: int, hi_us: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Calendar day index and start (epoch µs) of ``n`` sessions inside ``[lo_us, hi_us)``."""
    n_cal = -(-(hi_us - first_day_us) // DAY)
    weekday0 = dt.datetime.fromtimestamp(first_day_us / SECOND, dt.UTC).weekday()
    d = np.arange(n_cal)
    w = _WEEKDAY[(weekday0 + d) % 7] * (1.0 + 0.2 * d / n_cal) * rng.lognormal(0, 0.08, n_cal)
    day = rng.choice(n_cal, size=n, p=w / w.sum())
    # Starts in the partial first or last calendar day wrap to the other end at the same hour.
    start = first_day_us + day * DAY + _time_of_day(n, rng)
    start = np.sort(lo_us + (start - lo_us) % (hi_us - lo_us))
    return (start - first_day_us) // DAY, start


def session_lengths(n_views: int, rng: np.random.Generator) -> np.ndarray:
    """Draw geometric views per session (at most ``_MAX_VIEWS``) adding up to ``n_views``."""
    starts = rng.random(n_views) < 1.0 / _MEAN_VIEWS
    starts[::_MAX_VIEWS] = True
    return np.diff(np.append(np.flatnonzero(starts), n_views))


def user_weights(n_users: int, rng: np.random.Generator) -> np.ndarray:
    """Each user's share of the sessions: Zipf-like, in random order."""
    return zipf(n_users, 1.0, 0.01 * n_users + 5.0, rng)


def user_tastes(seed: int, start: int, stop: int) -> Tastes:
    """The preferred styles and colours of users ``start .. stop-1``: one or two of each.

    A user's tastes depend on the seed and the user's number only (not on the shop's size), so a
    batch of users has the tastes those users have in the whole shop.
    """
    blocks = range(start // _TASTE_BLOCK, max(start, stop - 1) // _TASTE_BLOCK + 1)
    drawn = [_block_tastes(np.random.default_rng([_TASTE_STREAM, seed, b])) for b in blocks]
    first = start - blocks.start * _TASTE_BLOCK
    users = slice(first, first + stop - start)
    return Tastes(np.concatenate([t.style for t in drawn])[users],
                  np.concatenate([t.colour for t in drawn])[users])


def _block_tastes(rng: np.random.Generator) -> Tastes:
    """The tastes of a block of ``_TASTE_BLOCK`` users, drawn uniformly."""

    def preferred(n_values: int) -> np.ndarray:
        first = rng.integers(0, n_values, _TASTE_BLOCK)
        other = (first + rng.integers(1, n_values, _TASTE_BLOCK)) % n_values
        second = np.where(rng.random(_TASTE_BLOCK) < _P_ONE_TASTE, first, other)
        return np.stack([first, second], axis=1).astype(np.int8)

    return Tastes(preferred(N_STYLES), preferred(N_COLOURS))


def plan_sessions(cat: Catalogue, length: np.ndarray, weights: np.ndarray,
                   window: tuple[int, int, int], rng: np.random.Generator, tastes: Tastes
                   ) -> Sessions:
    """Who shops when, in which sub-categories, keeping to which style and colour.

    A session's user is an index into ``weights`` (which sum to 1) and into ``tastes``.
    """
    n, n_users = len(length), len(weights)
    user = rng.choice(n_users, n, p=weights)
    leaf_pop = np.add.reduceat(cat.base, cat.leaf_start[:-1])
    leaf_pop = leaf_pop / leaf_pop.sum()
    home = rng.choice(len(leaf_pop), (n_users, 2), p=leaf_pop)
    own = home[user, (rng.random(n) < 0.35).astype(np.int64)]
    primary = np.where(rng.random(n) < 0.7, own, rng.choice(len(leaf_pop), n, p=leaf_pop))
    secondary = np.where(rng.random(n) < 0.35, cat.related[primary], primary)
    day, start = session_starts(n, *window, rng)
    taste = leaf_runs(tastes.style[user, rng.integers(0, 2, n)],
                      tastes.colour[user, rng.integers(0, 2, n)])
    return Sessions(user.astype(np.int32), day, start, primary, secondary, length, taste)


def _draw(cat: Catalogue, ses: Sessions, s: np.ndarray, leaf: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """Items of ``leaf`` for the sessions ``s``, often of the session's style and colour."""
    r = rng.random(len(s))
    narrowing = (r < _P_STYLE).astype(np.int64) + (r < _P_STYLE * _P_COLOUR)
    return cat.draw(leaf, ses.day[s], rng, ses.taste[s, narrowing])


def _next_items(cat: Catalogue, ses: Sessions, s: np.ndarray, prev: np.ndarray,
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
    out[draw] = _draw(cat, ses, s[draw], leaf[draw], rng)
    again = draw & (out == prev)  # a second try makes immediate repeats rarer
    out[again] = _draw(cat, ses, s[again], leaf[again], rng)
    return out


def _session_views(cat: Catalogue, ses: Sessions, rng: np.random.Generator) -> Batch:
    """All views, session by session, built one position at a time across every session."""
    offsets = np.cumsum(ses.length) - ses.length
    n = int(ses.length.sum())
    item = np.empty(n, dtype=np.int32)
    ts = np.empty(n, dtype=np.int64)
    item[offsets] = _draw(cat, ses, np.arange(len(ses.length)), ses.primary, rng)
    ts[offsets] = ses.start
    for t in range(1, int(ses.length.max())):
        s = np.flatnonzero(ses.length > t)
        at = offsets[s] + t
        item[at] = _next_items(cat, ses, s, item[at - 1], rng)
        ts[at] = ts[at - 1] + (rng.lognormal(np.log(25.0), 0.9, len(s)) * SECOND).astype(np.int64)
    session = np.repeat(np.arange(len(ses.length), dtype=np.int32), ses.length)
    kind = np.full(n, _VIEW, dtype=np.int8)
    return Batch(ses.user[session], item, kind, ts, session, np.ones(n, dtype=np.int16))


def _views_day_by_day(cat: Catalogue, ses: Sessions, rng: np.random.Generator) -> Batch:
    """:func:`_session_views` for the sessions of one calendar day at a time.

    Only that day's popularity is kept (:meth:`Catalogue.forget`), so memory follows the
    catalogue, not the catalogue times the days.
    """
    bounds = np.flatnonzero(np.diff(ses.day, prepend=-1, append=ses.day[-1] + 1))
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = _session_views(cat, ses.slice(start, stop), rng)
        part.session += start
        parts.append(part)
        cat.forget()
    return Batch.concat(parts)


def _quantities(cat: Catalogue, item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Units bought: consumables often several, other items mostly one."""
    several = 1 + np.minimum(rng.poisson(0.7, len(item)), 5)
    pair = 1 + (rng.random(len(item)) < 0.06)
    return np.where(cat.consumable[item], several, pair).astype(np.int16)


def _funnel(cat: Catalogue, views: Batch, session_end: np.ndarray, propensity: np.ndarray,
            rng: np.random.Generator) -> list[Batch]:
    """Carts and favourites after views; purchases of carted items at the end of the session."""
    n = len(views.ts)
    p_cart = np.minimum(P_CART * propensity[views.user], 0.5)
    carts = views.take(rng.random(n) < p_cart)
    carts = carts.derive(_CART, carts.ts + _seconds(rng, 5.0, 40.0, len(carts.ts)))
    favs = views.take(rng.random(n) < P_FAV)
    favs = favs.derive(_FAV, favs.ts + _seconds(rng, 2.0, 20.0, len(favs.ts)))
    buys = carts.take(rng.random(len(carts.ts)) < P_BUY)
    checkout = np.maximum(buys.ts, session_end[buys.session])
    buy_ts = checkout + _seconds(rng, 20.0, 150.0, len(buys.ts))
    return [carts, favs, buys.derive(_PURCHASE, buy_ts, _quantities(cat, buys.item, rng))]


def _rebuys(cat: Catalogue, purchases: Batch, next_session: int, first_day_us: int,
            end_us: int, rng: np.random.Generator) -> list[Batch]:
    """Short view-cart-purchase sessions in which users buy their consumables again."""
    out: list[Batch] = []
    src = purchases.take(cat.consumable[purchases.item])
    for _ in range(_REBUY_ROUNDS):
        src = src.take(rng.random(len(src.ts)) < _P_REBUY)
        n = len(src.ts)
        gap = cat.rebuy_days[cat.leaf[src.item]] * rng.lognormal(0.0, 0.25, n) * DAY
        day = (src.ts + gap.astype(np.int64) - first_day_us) // DAY
        view = src.derive(_VIEW, first_day_us + day * DAY + _time_of_day(n, rng),
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


def events_frame(batches: list[Batch], cat: Catalogue, item_ids: pl.Series,
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
        SESSION: make_ids("s", len(uniq), sessions[1], sessions[0]).gather(number[session]),
        PRICE: cat.price[item].astype(np.float64),
        QUANTITY: column("qty").astype(np.int64),
    })


def simulate(cat: Catalogue, ses: Sessions, n_users: int, window: tuple[int, int, int],
              rng: np.random.Generator, by_day: bool = False, shift: Shift | None = None
              ) -> list[Batch]:
    """Views, the funnel after them and the rebuys of the planned sessions of ``n_users``.

    With ``by_day`` the views are drawn one calendar day at a time (:func:`_views_day_by_day`).
    With ``shift`` the shop is first simulated without it, drawing exactly what it draws without
    one, so every event before the shift day is the unshifted shop's; the sessions starting on or
    after that day are then replayed under the new regime (:func:`_replay`).
    """
    views = (_views_day_by_day if by_day else _session_views)(cat, ses, rng)
    propensity = rng.lognormal(0.0, 0.35, n_users)
    propensity /= propensity[ses.user].mean()
    session_end = views.ts[np.cumsum(ses.length) - 1]
    batches = [views, *_funnel(cat, views, session_end, propensity, rng)]
    batches += _rebuys(cat, batches[-1], len(ses.length), window[0], window[2], rng)
    if shift is None:
        return batches
    cat.forget()  # the replay draws from the shift's catalogue
    return _replay(batches, ses, propensity, window, shift, by_day)


def _replay(before: list[Batch], ses: Sessions, propensity: np.ndarray,
            window: tuple[int, int, int], shift: Shift, by_day: bool) -> list[Batch]:
    """The unshifted events ``before`` with the sessions from ``shift.day`` on replayed.

    Kept: the sessions that start before the shift day (whole, even past midnight) and the
    rebuys before it. Replayed with ``shift.rng``: the later sessions in the new regime's leaves
    and catalogue, their funnel (each user keeps their propensity), and from the shift day on the
    rebuys of every kept or replayed purchase.
    """
    first, n_ses = int(np.searchsorted(ses.day, shift.day)), len(ses.length)
    boundary = window[0] + shift.day * DAY
    kept = Batch.concat([b.take((b.session < first) | ((b.session >= n_ses) & (b.ts < boundary)))
                         for b in before])
    bought = [kept.take((kept.kind == _PURCHASE) & (kept.session < first))]
    out = [kept]
    if first < n_ses:
        later = shift.sessions(ses.slice(first, n_ses), len(propensity))
        views = (_views_day_by_day if by_day else _session_views)(shift.cat, later, shift.rng)
        session_end = views.ts[np.cumsum(later.length) - 1]
        replayed = [views, *_funnel(shift.cat, views, session_end, propensity, shift.rng)]
        out += [dataclasses.replace(b, session=b.session + first) for b in replayed]
        bought.append(out[-1])
    next_session = max(int(b.session.max()) for b in before if len(b.session)) + 1
    rebuys = _rebuys(shift.cat, Batch.concat(bought), next_session, window[0], window[2],
                     shift.rng)
    return out + [b.take(b.ts >= boundary) for b in rebuys]
