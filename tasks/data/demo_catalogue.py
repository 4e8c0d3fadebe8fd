"""The demo shop's catalogue: categories, brands, prices, attributes, texts and popularity.

Eight top-level categories (the first three consumable) with six sub-categories each, brands per
top-level category, log-normal prices per sub-category, Zipf-like item weights with a launch day
and a rise-and-fade curve, and a fixed complement per item (see :mod:`tasks.data.demo_data`).
Each item has four attributes, a colour, a material, a style and a use, drawn uniformly from
small vocabularies whose words suit its top-level category (:data:`WORDS`: in grocery the
"colour" is a taste such as "spicy" and the "material" a flavour such as "ginger"). Its title
and description name them. Within a sub-category items are stored by style, then colour, so
the items of a sub-category that share a style (and a colour) are a contiguous run: a draw can
be narrowed to the taste of a shopper (:meth:`Catalogue.draw`).
:func:`launch_category` gives the catalogue after a regime change: a ninth top-level category
launched on one day and the popularity order of the items within each sub-category rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import polars as pl

from models.columns import (
    BRAND,
    CATEGORY,
    DESCRIPTION,
    ITEM,
    PRICE,
    TITLE,
)

SECOND = 1_000_000  # microseconds
DAY = 86_400 * SECOND
_CACHE_CELLS = 30_000_000  # largest (days x (items + runs)) popularity cache kept in memory

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


class Words(NamedTuple):
    """The attribute vocabularies of one top-level category, and how its description joins them.

    Titles read ``"<Brand> <style> <colour> <material> <noun>"``, descriptions ``"A <style>
    <noun> for <use>, <joiner> <colour> <material>."`` ("An" before a vowel), e.g. "Kalo casual
    red cotton shirt" and "A casual shirt for the office, in red cotton."
    """

    colour: tuple[str, ...]  # N_COLOURS words
    material: tuple[str, ...]  # N_MATERIALS words
    style: tuple[str, ...]  # N_STYLES words
    use: tuple[str, ...]  # N_USES words
    joiner: str


N_COLOURS, N_MATERIALS, N_STYLES, N_USES = 8, 6, 5, 5
_PALETTE = ("red", "blue", "green", "black", "white", "grey", "yellow", "pink")
# Per top-level category, in the order of _TOPS, then the launched category's.
WORDS: tuple[Words, ...] = (
    Words(("organic", "spicy", "sweet", "mild", "smoky", "fresh", "zesty", "rich"),
          ("lemon", "vanilla", "honey", "tomato", "ginger", "cocoa"),
          ("classic", "premium", "artisan", "family", "light"),
          ("breakfast", "lunch", "dinner", "snacking", "parties"), "with"),
    Words(("gentle", "rich", "light", "fresh", "pure", "soothing", "vivid", "natural"),
          ("rose", "lavender", "citrus", "coconut", "aloe", "sandalwood"),
          ("classic", "luxury", "vegan", "botanical", "sensitive"),
          ("daily care", "evenings", "the gym", "travel", "gifting"), "with"),
    Words(("tender", "crunchy", "hearty", "natural", "grain-free", "gentle", "fresh", "chewy"),
          ("chicken", "salmon", "beef", "lamb", "turkey", "duck"),
          ("classic", "premium", "veterinary", "organic", "everyday"),
          ("puppies", "seniors", "active pets", "small breeds", "indoor cats"), "with"),
    Words(_PALETTE, ("cotton", "linen", "ceramic", "glass", "oak", "wool"),
          ("modern", "rustic", "minimalist", "vintage", "nordic"),
          ("the bedroom", "the kitchen", "the living room", "the garden", "the office"), "in"),
    Words(("black", "white", "silver", "grey", "blue", "red", "gold", "green"),
          ("aluminium", "plastic", "steel", "glass", "carbon", "rubber"),
          ("compact", "pro", "wireless", "rugged", "classic"),
          ("gaming", "travel", "the office", "studio work", "home cinema"), "in"),
    Words(("red", "blue", "green", "black", "white", "grey", "beige", "navy"),
          ("cotton", "denim", "leather", "wool", "linen", "silk"),
          ("casual", "formal", "sporty", "vintage", "streetwear"),
          ("everyday wear", "the office", "evenings out", "travel", "the weekend"), "in"),
    Words(_PALETTE, ("rubber", "steel", "foam", "nylon", "carbon", "cork"),
          ("pro", "beginner", "compact", "classic", "lightweight"),
          ("the gym", "running", "yoga", "outdoor play", "team training"), "in"),
    Words(("red", "blue", "green", "yellow", "orange", "purple", "pink", "white"),
          ("wood", "plastic", "felt", "cardboard", "plush", "metal"),
          ("classic", "educational", "creative", "collectible", "retro"),
          ("toddlers", "preschoolers", "school kids", "the whole family", "teens"), "in"),
    Words(("black", "white", "silver", "rose gold", "blue", "green", "grey", "red"),
          ("silicone", "titanium", "steel", "leather", "nylon", "ceramic"),
          ("sporty", "classic", "slim", "rugged", "smart"),
          ("running", "sleep tracking", "swimming", "the office", "cycling"), "in"),
)
_SHELVES = N_STYLES * N_COLOURS  # (style, colour) pairs
# Runs of items per sub-category: all its items, those of each style, of each style and colour.
RUNS = 1 + N_STYLES + _SHELVES
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
    colour: np.ndarray  # each attribute an index into its words in WORDS[top]
    material: np.ndarray
    style: np.ndarray
    use: np.ndarray
    runs: np.ndarray = field(init=False)  # (2, leaves x RUNS): first item and one past the last
    wider: np.ndarray = field(init=False)  # per run: the run it is part of (a leaf: itself)
    _days: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Index the runs of each leaf (see :func:`leaf_runs`): RUNS in a row per leaf."""
        shelf = (self.leaf.astype(np.int64) * N_STYLES + self.style) * N_COLOURS + self.colour
        assert (np.diff(shelf) >= 0).all(), "items must be stored by leaf, style and colour"
        n_leaves = len(self.related)
        start = np.searchsorted(shelf, np.arange(n_leaves * _SHELVES + 1))
        # Per run of a leaf: its first shelf, its number of shelves and the run it is part of.
        first = np.concatenate([[0], np.arange(N_STYLES) * N_COLOURS, np.arange(_SHELVES)])
        size = np.repeat([_SHELVES, N_COLOURS, 1], [1, N_STYLES, _SHELVES])
        wider = np.concatenate([np.zeros(1 + N_STYLES), 1 + np.arange(_SHELVES) // N_COLOURS])
        first = (np.arange(n_leaves)[:, None] * _SHELVES + first).ravel()
        self.runs = np.stack([start[first], start[first + np.tile(size, n_leaves)]])
        self.wider = (np.arange(n_leaves)[:, None] * RUNS + wider.astype(np.int64)).ravel()

    @property
    def consumable(self) -> np.ndarray:
        """Whether each item belongs to a consumable top-level category."""
        return self.top[self.leaf] < _N_CONSUMABLE

    def on_sale(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        """The running sum of the items' popularity on ``day``, and the runs drawn from then.

        Entry ``i`` of the running sum (from 0 to the number of items) is the popularity of the
        items before ``i``; an item adds 0 before its launch. Per run, the second array is the
        run a draw from it takes that day: itself when some of its items sell, else the
        narrowest wider one that does (a leaf always sells: it has an evergreen item).
        """
        if day in self._days:
            return self._days[day]
        age = day + 0.5 - self.launch
        x = np.clip(age, 0.0, None) / self.peak
        curve = self.floor + (1.0 - self.floor) * x * np.exp(1.0 - x)
        edges = np.append(0.0, np.cumsum(np.where(age >= 0, self.base * curve, 0.0)))
        sells = edges[self.runs[1]] > edges[self.runs[0]]
        run = np.arange(len(self.wider))
        for _ in range(2):  # a run of a colour falls back to its style's, that to its leaf
            run = np.where(sells[run], run, self.wider[run])
        if (len(self._days) + 1) * (len(edges) + len(run)) <= _CACHE_CELLS:
            self._days[day] = edges, run
        return edges, run

    def forget(self) -> None:
        """Drop the cached popularity of every day."""
        self._days.clear()

    def draw(self, leaf: np.ndarray, day: np.ndarray, rng: np.random.Generator,
             run: np.ndarray | None = None) -> np.ndarray:
        """One item per query from ``leaf``, weighted by each item's popularity on ``day``.

        With ``run`` (per query, one of the leaf's runs: :func:`leaf_runs`) the draw keeps to
        the leaf's items of a style, or of a style and colour; when none of those is on sale
        that day, it draws from the wider run instead.
        """
        u = rng.random(len(leaf))
        run = leaf * RUNS if run is None else leaf * RUNS + run
        out = np.empty(len(leaf), dtype=np.int64)
        order = np.argsort(day, kind="stable")
        days, first = np.unique(day[order], return_index=True)
        bounds = np.append(first, len(order))
        for d, a, b in zip(days, bounds[:-1], bounds[1:], strict=True):
            sel = order[a:b]
            edges, runs_on_sale = self.on_sale(int(d))
            lo, hi = self.runs[:, runs_on_sale[run[sel]]]
            out[sel] = pick_between(edges, lo, hi, u[sel])
        return out


def leaf_runs(style: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Per query, the runs of a leaf (numbers below :data:`RUNS`) to draw from: ``(query, 3)``.

    Column 0 is the run of all the leaf's items, 1 of its items of ``style``, 2 of its items of
    ``style`` and ``colour``.
    """
    style, colour = style.astype(np.int64), colour.astype(np.int64)
    return np.stack([np.zeros_like(style), 1 + style,
                     1 + N_STYLES + style * N_COLOURS + colour], axis=1)


def zipf(n: int, exponent: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-Mandelbrot weights ``(rank + offset) ** -exponent`` in random order, summing to 1."""
    w = (np.arange(1, n + 1) + offset) ** -exponent
    return rng.permutation(w / w.sum())


def pick(cum: np.ndarray, leaf_start: np.ndarray, leaf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw within each query's leaf segment of the running sum ``cum``."""
    return pick_between(np.append(0.0, cum), leaf_start[leaf], leaf_start[leaf + 1], u)


def pick_between(edges: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray
                 ) -> np.ndarray:
    """Inverse-CDF draw among each query's items ``lo .. hi-1``.

    ``edges[i]`` is the weight of the items before ``i``: a running sum that starts at 0.
    """
    target = edges[lo] + u * (edges[hi] - edges[lo])
    return np.clip(np.searchsorted(edges, target, side="right") - 1, lo, hi - 1)


def draw_attributes(leaf: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Colour, material, style and use of items stored by ``leaf`` (sorted), drawn uniformly.

    Within each leaf the styles and colours are sorted (by style, then colour). No other draw
    of an item depends on its place in its leaf, so this only chooses which item gets which.
    """
    n = len(leaf)
    style, colour = rng.integers(0, N_STYLES, n), rng.integers(0, N_COLOURS, n)
    order = np.lexsort((colour, style, leaf))
    return {"colour": colour[order].astype(np.int8),
            "material": rng.integers(0, N_MATERIALS, n).astype(np.int8),
            "style": style[order].astype(np.int8),
            "use": rng.integers(0, N_USES, n).astype(np.int8)}


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
        top=np.arange(n_leaves) % _N_TOPS, **draw_attributes(leaf, rng),
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
    every existing item keeps its index, code, brand, price and attributes. Its items (with
    attributes of their own) launch on ``day``,
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
    added = draw_attributes(leaf, rng)
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
        **{name: _joined(getattr(cat, name), values) for name, values in added.items()},
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
    """Build the canonical items table, sorted by ``item_id``.

    Titles and descriptions name the item's attributes with the words of :data:`WORDS` (see
    :class:`Words`).
    """
    tops = cat.top
    by_top = np.argsort(tops, kind="stable")
    subs = np.empty_like(tops)  # a leaf's number within its top-level category
    subs[by_top] = np.arange(len(tops)) - np.searchsorted(tops[by_top], tops[by_top])
    item_top = tops[cat.leaf]

    def words(name: str, values: np.ndarray) -> pl.Series:
        vocabulary = [getattr(w, name) for w in WORDS]
        return pl.Series([v for vs in vocabulary for v in vs]).gather(
            item_top * len(vocabulary[0]) + values)

    frame = pl.DataFrame({
        ITEM: item_ids.gather(cat.code),
        CATEGORY: pl.Series([f"c{t}/c{t}.{k}" for t, k in zip(tops, subs, strict=True)]).gather(
            cat.leaf),
        BRAND: _brand_names(int(cat.brand.max()) + 1).gather(cat.brand),
        PRICE: cat.price.astype(np.float64),
        "noun": _leaf_nouns(tops, subs).gather(cat.leaf),
        "colour": words("colour", cat.colour),
        "material": words("material", cat.material),
        "style": words("style", cat.style),
        "use": words("use", cat.use),
        "joiner": pl.Series([w.joiner for w in WORDS]).gather(item_top),
    })
    title = pl.format("{} {} {} {} {}", BRAND, "style", "colour", "material", "noun")
    article = pl.when(pl.col("style").str.contains("^[aeiou]")).then(pl.lit("An")).otherwise(
        pl.lit("A"))
    description = pl.format("{} {} {} for {}, {} {} {}.", article, "style", "noun", "use",
                            "joiner", "colour", "material")
    return (frame.select(ITEM, CATEGORY, BRAND, PRICE, title.alias(TITLE),
                         description.alias(DESCRIPTION)).sort(ITEM))


def _leaf_nouns(tops: np.ndarray, subs: np.ndarray) -> pl.Series:
    """Per leaf, its noun: the ``sub``-th of its top-level category's, numbered past the last."""
    nouns = [*(t[2] for t in _TOPS), _LAUNCHED[2]]
    return pl.Series([nouns[t][k % len(nouns[t])] + (f" {k // len(nouns[t]) + 1}"
                                                     if k >= len(nouns[t]) else "")
                      for t, k in zip(tops, subs, strict=True)])


def _brand_names(n_brands: int) -> pl.Series:
    """Made-up brand names of two or three syllables, one per brand number."""
    syl = _SYLLABLES
    return pl.Series([syl[b % 20].title() + syl[b // 20 % 20] + (syl[b // 400 - 1] if b >= 400
                                                                  else "")
                      for b in range(n_brands)])
