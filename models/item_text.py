"""Item understanding from the catalogue's text: each item's words to a dense unit vector.

:func:`item_texts` joins what the catalogue says of an item (title, description, category path,
brand, attributes) into one text; an :class:`ItemEncoder` turns texts into L2-normalised
``float32`` vectors; :func:`encode_items` does both and checks the result (no NaN, unit norms).

Two encoders sit behind the one interface (:func:`encoder_from_spec`):

* ``wordllama`` (default): WordLlama's 256-dimension ``l2_supercat`` token embeddings, average
  pooled. Its weights and tokenizer ship inside the ``wordllama`` wheel, so nothing is
  downloaded: the files are opened from the package folder directly (``WordLlama.load`` of
  0.4.0 looks for the tokenizer in ``tokenizer/`` while the wheel puts it in ``tokenizers/``,
  and falls back to a download). 6,000 (long texts) to 28,000 (short titles) items a second
  on one CPU core, in batches of 64.
* ``sentence-transformers:<folder>``: a sentence-transformers model already on disk (larger,
  better, slower; GPU when present). The package is not a dependency: install it to use this.

Vectors depend only on the texts and the encoder (:attr:`ItemEncoder.name`), never on the run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from models.columns import ATTRIBUTES, BRAND, CATEGORY, DESCRIPTION, ITEM, TITLE
from models.errors import ConfigError, DataError

TEXT_COLUMNS = (TITLE, DESCRIPTION, CATEGORY, BRAND)
VECTOR = "vector"
NORM_TOLERANCE = 1e-3


class ItemEncoder(Protocol):
    """Texts to L2-normalised vectors; ``name`` says which model (and version) made them."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """``len(texts) x dim`` float32, each row of unit norm (zero when nothing was read)."""
        ...


class WordLlamaEncoder:
    """WordLlama ``l2_supercat`` (256 dimensions), loaded from the files inside its wheel."""

    config, weights, tokenizer = ("l2_supercat", "l2_supercat_256.safetensors",
                                  "l2_supercat_tokenizer_config.json")

    def __init__(self, batch_size: int = 64) -> None:
        try:
            import wordllama
            from safetensors import safe_open
            from wordllama import WordLlama
            from wordllama.inference import WordLlamaInference
        except ImportError as err:  # pragma: no cover - a dependency of shoprank
            raise ConfigError("content.encoder 'wordllama' needs the wordllama package "
                              "(pip install wordllama==0.4.0.post1).") from err
        root = Path(wordllama.__file__).parent
        weights, tokenizer = root / "weights" / self.weights, root / "tokenizers" / self.tokenizer
        for path in (weights, tokenizer):
            if not path.is_file():
                raise ConfigError(f"the wordllama package has no {path} (its wheel ships the "
                                  "weights and the tokenizer): reinstall wordllama==0.4.0.post1.")
        with safe_open(str(weights), framework="np", device="cpu") as handle:
            table = handle.get_tensor("embedding.weight")
        self._model = WordLlamaInference(table, WordLlama.load_tokenizer(tokenizer),
                                         binary=False)
        self.batch_size = batch_size
        self.dim = int(table.shape[1])
        version = getattr(wordllama, "__version__", "unknown")
        self.name = f"wordllama-{version}-{self.config}-{self.dim}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """Average-pooled token embeddings, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.embed(texts, norm=False, batch_size=self.batch_size)
        return normalised(np.asarray(vectors, dtype=np.float32))


class SentenceTransformerEncoder:
    """A sentence-transformers model from a folder on disk (never downloaded)."""

    def __init__(self, folder: str, batch_size: int = 256) -> None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(f"content.encoder 'sentence-transformers:{folder}': no such "
                              "folder. Give a model saved on disk (model.save(folder)).")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ConfigError("content.encoder 'sentence-transformers:...' needs the "
                              "sentence-transformers package: pip install "
                              "sentence-transformers, or use 'wordllama'.") from err
        self._model = SentenceTransformer(str(path), local_files_only=True)
        self.batch_size = batch_size
        self.dim = int(self._model.get_sentence_embedding_dimension())
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        self.name = f"sentence-transformers-{path.name}-{digest}-{self.dim}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """The model's sentence embeddings, L2-normalised."""
        vectors = self._model.encode(texts, batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False)
        return normalised(np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim))


def encoder_from_spec(spec: str) -> ItemEncoder:
    """``wordllama`` or ``sentence-transformers:<folder>``."""
    kind, _, argument = spec.partition(":")
    if kind == "wordllama" and not argument:
        return WordLlamaEncoder()
    if kind == "sentence-transformers" and argument:
        return SentenceTransformerEncoder(argument)
    raise ConfigError(f"unknown content.encoder {spec!r}: use 'wordllama' or "
                      "'sentence-transformers:<folder of a saved model>'.")


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows (empty texts) stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def item_texts(items: pl.DataFrame) -> pl.DataFrame:
    """``item_id, text``: title, description, category path, brand and attributes of each item.

    Category paths read as words (``c4/c4.2`` as ``c4 c4.2``). Columns the catalogue lacks are
    skipped; an item with nothing gets an empty text (and a zero vector).
    """
    parts = [pl.col(c).cast(pl.String).str.replace_all("/", " ") if c == CATEGORY
             else pl.col(c).cast(pl.String) for c in TEXT_COLUMNS if c in items.columns]
    if ATTRIBUTES in items.columns:
        parts.append(pl.col(ATTRIBUTES).list.join(" "))
    text = (pl.concat_str(parts, separator=". ", ignore_nulls=True) if parts
            else pl.lit(""))
    return items.select(ITEM, text.fill_null("").str.strip_chars().alias("text"))


def has_text(items: pl.DataFrame) -> bool:
    """Whether the catalogue says anything in words: a title, description, brand or attribute.

    A category id alone (often a number, as in Taobao's log) is not text worth encoding.
    """
    words = [c for c in (TITLE, DESCRIPTION, BRAND, ATTRIBUTES) if c in items.columns]
    return any(items[c].drop_nulls().len() > 0 for c in words)


def texts_digest(texts: pl.DataFrame, encoder_name: str) -> str:
    """SHA-256 of the encoder's name and every ``item_id, text`` pair, in item order."""
    digest = hashlib.sha256(encoder_name.encode())
    for item, text in texts.sort(ITEM).iter_rows():
        digest.update(f"{item}\x00{text}\x01".encode())
    return digest.hexdigest()


def encode_items(items: pl.DataFrame, encoder: ItemEncoder) -> pl.DataFrame:
    """``item_id, vector`` (``Array(Float32, dim)``) of every catalogue item, checked.

    Raises:
        DataError: The catalogue has no item, or the encoder returned a vector with NaN or a
            norm other than 1 (or 0: nothing read).
    """
    texts = item_texts(items)
    if texts.height == 0:
        raise DataError("the items table is empty: there is nothing to encode.")
    vectors = encoder.encode(texts["text"].to_list())
    check_vectors(vectors, texts.height, encoder.name)
    return pl.DataFrame({ITEM: texts[ITEM],
                         VECTOR: pl.Series(vectors, dtype=pl.Array(pl.Float32, encoder.dim))})


def check_vectors(vectors: np.ndarray, rows: int, encoder_name: str) -> None:
    """``rows`` vectors of finite values, each of unit norm (or zero: nothing to read)."""
    if vectors.shape[0] != rows:
        raise DataError(f"encoder {encoder_name} returned {vectors.shape[0]} vectors for "
                        f"{rows} items.")
    if not np.isfinite(vectors).all():
        raise DataError(f"encoder {encoder_name} returned non-finite values (NaN or inf) for "
                        f"{int((~np.isfinite(vectors)).any(axis=1).sum())} items.")
    norms = np.linalg.norm(vectors, axis=1)
    off = (np.abs(norms - 1.0) > NORM_TOLERANCE) & (norms > 0)
    if off.any():
        raise DataError(f"encoder {encoder_name}: {int(off.sum())} vectors are neither of unit "
                        "norm nor zero.")
