"""A LightGBM booster's trees compiled to machine code, for scoring many rows.

LightGBM walks each tree for each row through its generic tree structure; Treelite reads the
booster and TL2cgen writes it out as C (one nested ``if`` per split, thresholds quantized to
integer indices) that the host's C compiler turns into a shared library. On the ranker's
features the library scores the same numbers (the same comparisons in double precision, the
trees added in the same order) in about 40% of LightGBM's time (BENCHMARKS.md), for a one-off
compilation of a few seconds per hundred trees.

A library is compiled once per host and booster: it is cached under
``$XDG_CACHE_HOME/shoprank/compiled-trees`` (``~/.cache`` when unset; ``SHOPRANK_TREES_CACHE``
moves it), named by a digest of the model's text, its number of trees and the compilers'
versions, and written under a temporary name then renamed into place, so that processes
compiling the same booster at once, or one killed while compiling, never leave a partial
library where another would load it.

Treelite and TL2cgen are imported only here, when a library is first needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import ConfigError

if TYPE_CHECKING:
    import lightgbm as lgb

logger = logging.getLogger(__name__)

CACHE_ENV = "SHOPRANK_TREES_CACHE"
COMPILER_OPTIONS = ("-O3",)
PARAMS = {"quantize": 1, "parallel_comp": 8}
"""TL2cgen's code generation: thresholds as integer indices (2x faster here than comparing
doubles, same results), the trees split over 8 files compiled side by side."""


def cache_dir() -> Path:
    """The folder of the compiled libraries on this host."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shoprank" / "compiled-trees"


class CompiledTrees:
    """The first ``trees`` trees of a booster as a compiled library.

    Args:
        booster: The LightGBM booster.
        trees: How many of its first trees (its boosting rounds) the library sums.
        nthread: Threads of each prediction (0 or None: every core).
    """

    def __init__(self, booster: lgb.Booster, trees: int, nthread: int | None = None) -> None:
        import tl2cgen

        text = booster.model_to_string(num_iteration=trees)
        self.trees = trees
        self.path = _library(text, trees)
        self._predictor = tl2cgen.Predictor(str(self.path), nthread=nthread or None)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw scores of the rows of ``x`` (features in the booster's order; NaN: missing)."""
        import tl2cgen

        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        matrix = tl2cgen.DMatrix(np.ascontiguousarray(x, dtype=np.float64), dtype="float64")
        return np.asarray(self._predictor.predict(matrix), dtype=np.float64).reshape(-1)


def _library(text: str, trees: int) -> Path:
    """The cached library of the model ``text``, compiled now if this host has none yet."""
    import tl2cgen
    import treelite

    key = hashlib.sha256("\n".join([
        text, str(trees), version("treelite"), version("tl2cgen"), " ".join(COMPILER_OPTIONS),
        repr(sorted(PARAMS.items()))]).encode()).hexdigest()[:32]
    folder = cache_dir()
    path = folder / f"trees-{key}.so"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".compiling-") as work:
        source = Path(work) / "model.txt"
        source.write_text(text)
        model = treelite.frontend.load_lightgbm_model(str(source))
        built = Path(work) / path.name
        try:
            tl2cgen.export_lib(model, toolchain="gcc", libpath=str(built), params=PARAMS,
                               nthread=os.cpu_count(), options=list(COMPILER_OPTIONS))
        except Exception as err:  # TL2cgen raises its own errors for a failed compiler run
            raise ConfigError(
                f"compiling the ranker's {trees} trees failed ({err}); this needs a C compiler "
                "(gcc) on the PATH: install one, or set the ranker's compile_trees to 'never' "
                "to score with LightGBM.") from err
        os.replace(built, path)
    logger.info("compiled %d trees into %s", trees, path)
    return path
