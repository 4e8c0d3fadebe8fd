"""The demo shop's catalogue: categories, brands, prices, titles, launch days and popularity.

Eight top-level categories (the first three consumable) with six sub-categories each, brands per
top-level category, log-normal prices per sub-category, Zipf-like item weights with a launch day
and a rise-and-fade curve, and a fixed complement per item (see :mod:`tasks.data.demo_data`).
:func:`launch_category` gives the catalogue after a regime change: a ninth top-level category
launched on one day and the popularity order of the items within each sub-category rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from models.columns import (
    BRAND,
    CATEGORY,
    ITEM,
    PRICE,
    TITLE,
)

SECOND = 1_000_000  # microseconds
DAY = 86_400 * SECOND
_CACHE_CELLS = 30_000_000  # largest (days x items) popularity table kept in memory

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
# The category a regime change launches (top-level number _N_TOPS), one sub-category per noun.
_LAUNCHED = ("wearables", 95.0, ("smartwatch", "fitness band", "smart ring"))
_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "no", "ti", "sa", "du", "fe",
              "xo", "pi", "ze", "mo", "ru", "la", "bri", "qua", "ny", "tor")


@dataclass
class Catalogue:
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
    top: np.ndarray  # per leaf: its top-level category (an index into _TOPS, or _N_TOPS)
    _cums: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def consumable(self) -> np.ndarray:
        """Whether each item belongs to a consumable top-level category."""
        return self.top[self.leaf] < _N_CONSUMABLE

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
            out[sel] = pick(self.cumulative(int(d)), self.leaf_start, leaf[sel], u[sel])
        return out


def zipf(n: int, exponent: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-Mandelbrot weights ``(rank + offset) ** -exponent`` in random order, summing to 1."""
    w = (np.arange(1, n + 1) + offset) ** -exponent
    return rng.permutation(w / w.sum())


def pick(cum: np.ndarray, leaf_start: np.ndarray, leaf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw within each query's leaf segment of the running sum ``cum``."""
    lo, hi = leaf_start[leaf], leaf_start[leaf + 1]
    before = np.where(lo > 0, cum[lo - 1], 0.0)
    target = before + u * (cum[hi - 1] - before)
    return np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)


def build_catalogue(n_items: int, rng: np.random.Generator, n_days: int) -> Catalogue:
    """Items with sub-categories, brands, prices, popularity curves and complements."""
    n_leaves = int(np.clip(n_items // 40, 2 * _N_TOPS, 400))
    size_w = rng.lognormal(0.0, 0.6, n_leaves)
    extra = rng.choice(n_leaves, n_items - n_leaves, p=size_w / size_w.sum())
    leaf = np.sort(np.concatenate([np.arange(n_leaves), extra]))
    leaf_start = np.searchsorted(leaf, np.arange(n_leaves + 1))
    top = leaf % _N_TOPS
    per_top = int(np.clip(n_items // 240, 3, 600))
    brand = rng.choice(per_top, n_items, p=zipf(per_top, 1.0, 1.0, rng)) * _N_TOPS + top
    level = np.log([t[1] for t in _TOPS])[np.arange(n_leaves) % _N_TOPS]
    level = level + rng.normal(0.0, 0.4, n_leaves)
    brand_factor = rng.lognormal(0.0, 0.25, per_top * _N_TOPS)[brand]
    price = np.exp(level[leaf] + rng.normal(0.0, 0.45, n_items)) * brand_factor
    base = zipf(n_items, 1.05, 2.0, rng)
    launch = rng.uniform(-n_days, n_days, n_items)
    floor = rng.uniform(0.01, 0.15, n_items)
    staple = leaf_start[:-1] + rng.integers(0, np.diff(leaf_start))  # an evergreen item per leaf
    launch[staple], floor[staple] = -1e9, 1.0
    related = (np.arange(n_leaves) + rng.integers(1, n_leaves, n_leaves)) % n_leaves
    target = np.where(rng.random(n_items) < 0.5, leaf, related[leaf])
    complement = pick(np.cumsum(base), leaf_start, target, rng.random(n_items))
    return Catalogue(
        leaf=leaf, brand=brand, price=np.maximum(np.round(price, 2), 0.49), base=base,
        launch=launch, peak=rng.lognormal(np.log(5.0), 0.5, n_items), floor=floor,
        complement=complement, code=rng.permutation(n_items), leaf_start=leaf_start,
        related=related, rebuy_days=rng.uniform(6.0, 30.0, n_leaves),
        top=np.arange(n_leaves) % _N_TOPS,
    )


def rotated(order: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Rotate each segment of ``order`` by half its length: ``out[order[p]] = order[p + h]``.

    ``order`` lists indices segment by segment (``start`` holds each segment's first position,
    plus the end); within a segment position ``p`` goes to ``(p + h) % size``, ``h = size // 2``.
    """
    size = np.diff(start)
    seg = np.repeat(np.arange(len(size)), size)
    pos = np.arange(len(order)) - start[seg]
    out = np.empty_like(order)
    out[order] = order[start[seg] + (pos + size[seg] // 2) % size[seg]]
    return out


def taste_shift(cat: Catalogue) -> np.ndarray:
    """Per leaf, the leaf its shoppers turn to after a taste shift.

    The leaves ordered by popularity rotate by half: the most popular leaf's shoppers turn to
    the median one, and the least popular half's to the most popular half.
    """
    leaf_pop = np.add.reduceat(cat.base, cat.leaf_start[:-1])
    order = np.argsort(-leaf_pop, kind="stable")
    return rotated(order, np.array([0, len(order)]))


def launch_category(cat: Catalogue, day: int, rng: np.random.Generator) -> Catalogue:
    """The catalogue from ``day`` on: a new top-level category launched, and tastes rotated.

    The new category (``_LAUNCHED``) appends three sub-categories after the existing leaves, so
    every existing item keeps its index, code, brand and price. Its items launch on ``day``,
    peak within a day or two and stay popular; their complements are within the category. Within
    every existing sub-category the popularity ranks of the items rotate by half (see
    :func:`rotated`): yesterday's best-sellers become middling and part of the tail leads.
    """
    n_old, n_leaves, n_subs = len(cat.leaf), len(cat.related), len(_LAUNCHED[2])
    per_leaf = max(3, n_old // 150)
    leaf = np.repeat(n_leaves + np.arange(n_subs), per_leaf)
    n_new = len(leaf)
    by_rank = np.lexsort((-cat.base, cat.leaf))  # items leaf by leaf, most popular first
    base = np.append(cat.base[rotated(by_rank, cat.leaf_start)], zipf(n_new, 1.05, 2.0, rng))
    leaf_start = np.append(cat.leaf_start, n_old + per_leaf * np.arange(1, n_subs + 1))
    related = np.append(cat.related, n_leaves + (np.arange(n_subs) + 1) % n_subs)
    target = np.where(rng.random(n_new) < 0.5, leaf, related[leaf])
    complement = pick(np.cumsum(base), leaf_start, target, rng.random(n_new))
    brand = int(cat.brand.max()) + 1 + rng.integers(0, n_subs, n_new)
    price = np.exp(np.log(_LAUNCHED[1]) + rng.normal(0.0, 0.35, n_new))
    return Catalogue(
        leaf=_joined(cat.leaf, leaf), brand=_joined(cat.brand, brand),
        price=_joined(cat.price, np.round(price, 2)), base=base,
        launch=_joined(cat.launch, np.full(n_new, day)),
        peak=_joined(cat.peak, rng.lognormal(np.log(1.5), 0.3, n_new)),
        floor=_joined(cat.floor, rng.uniform(0.5, 0.8, n_new)),
        complement=_joined(cat.complement, complement),
        code=_joined(cat.code, n_old + np.arange(n_new)), leaf_start=leaf_start, related=related,
        rebuy_days=_joined(cat.rebuy_days, np.full(n_subs, 30.0)),
        top=_joined(cat.top, np.full(n_subs, _N_TOPS)),
    )


def _joined(old: np.ndarray, added: np.ndarray) -> np.ndarray:
    """``old`` followed by ``added``, in ``old``'s dtype."""
    return np.concatenate([old, added.astype(old.dtype)])


def make_ids(prefix: str, n: int, min_width: int, start: int = 0, total: int | None = None
         ) -> pl.Series:
    """``prefix`` and the numbers ``start .. start+n-1``, zero-padded as wide as ``total - 1``.

    ``total`` defaults to ``start + n``: the ids of a slice of ``total`` ids have their width.
    """
    width = max(min_width, len(str(max((total or start + n) - 1, 0))))
    number = pl.int_range(start, start + n, eager=True).cast(pl.String).str.zfill(width)
    return prefix + number


def items_frame(cat: Catalogue, item_ids: pl.Series) -> pl.DataFrame:
    """Build the canonical items table, sorted by ``item_id``."""
    tops = cat.top
    by_top = np.argsort(tops, kind="stable")
    subs = np.empty_like(tops)  # a leaf's number within its top-level category
    subs[by_top] = np.arange(len(tops)) - np.searchsorted(tops[by_top], tops[by_top])
    words = [*(t[2] for t in _TOPS), _LAUNCHED[2]]
    nouns = [words[t][k % len(words[t])] + (f" {k // len(words[t]) + 1}" if k >= len(words[t])
                                             else "") for t, k in zip(tops, subs, strict=True)]
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
