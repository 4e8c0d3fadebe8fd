"""Canonical column names, event types and dtypes shared by every stage.

The canonical tables (see the README):

* **events**: ``user_id`` (str), ``item_id`` (str), ``event_type`` (one of :data:`EVENT_TYPES`),
  ``timestamp`` (UTC datetime, microseconds); optional ``session_id`` (str), ``price`` (float),
  ``quantity`` (int).
* **items**: ``item_id`` (str); optional ``category_id`` (str), ``brand`` (str), ``price`` (float),
  ``title`` (str), ``description`` (str), ``attributes`` (list of str).

Ids are strings everywhere outside a model: datasets mix integer and hashed ids, and a string id
never loses a leading zero. Models map ids to dense integer indices internally.
"""

from __future__ import annotations

USER = "user_id"
ITEM = "item_id"
EVENT_TYPE = "event_type"
TIMESTAMP = "timestamp"
SESSION = "session_id"
PRICE = "price"
QUANTITY = "quantity"

CATEGORY = "category_id"
BRAND = "brand"
TITLE = "title"
DESCRIPTION = "description"
ATTRIBUTES = "attributes"
AVAILABLE = "available"  # false: never recommended (a business rule of the catalogue)

SCORE = "score"
RANK = "rank"

VIEW, CART, FAV, PURCHASE = "view", "cart", "fav", "purchase"
EVENT_TYPES: tuple[str, ...] = (VIEW, CART, FAV, PURCHASE)

EVENT_REQUIRED: tuple[str, ...] = (USER, ITEM, EVENT_TYPE, TIMESTAMP)
EVENT_OPTIONAL: tuple[str, ...] = (SESSION, PRICE, QUANTITY)
ITEM_REQUIRED: tuple[str, ...] = (ITEM,)
ITEM_OPTIONAL: tuple[str, ...] = (CATEGORY, BRAND, PRICE, TITLE, DESCRIPTION, ATTRIBUTES,
                                   AVAILABLE)

# Polars dtype names per canonical column (kept as strings so this module imports nothing).
EVENT_DTYPES: dict[str, str] = {
    USER: "String",
    ITEM: "String",
    EVENT_TYPE: "String",
    TIMESTAMP: "Datetime(us, UTC)",
    SESSION: "String",
    PRICE: "Float64",
    QUANTITY: "Int64",
}
ITEM_DTYPES: dict[str, str] = {
    ITEM: "String",
    CATEGORY: "String",
    BRAND: "String",
    PRICE: "Float64",
    TITLE: "String",
    DESCRIPTION: "String",
    ATTRIBUTES: "List(String)",
    AVAILABLE: "Boolean",
}
