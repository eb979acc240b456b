"""The shop's data: items in an in-memory table.

Plain dataclasses and a lock, no Flask state held at module level. Settings are read from
``current_app.config`` inside the functions that need them, at call time, so they follow the app
whose context is active (compare :mod:`ctxtrace.example.lazy_settings`, which does it wrong).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from flask import current_app


@dataclass(frozen=True)
class Item:
    """One product. Frozen so a reader holding it never sees a half-applied update."""

    id: int
    name: str
    price_cents: int
    stock: int


DEMO_ITEMS: tuple[Item, ...] = (
    Item(1, "teapot", 2400, 12),
    Item(2, "kettle", 3900, 2),
    Item(3, "mug", 800, 40),
    Item(4, "tea strainer", 500, 0),
)


def demo_items(count: int) -> list[Item]:
    """Return ``count`` items: the fixed demo items first, then numbered fillers."""
    items = list(DEMO_ITEMS[:count])
    for item_id in range(len(items) + 1, count + 1):
        items.append(Item(item_id, f"sample {item_id}", 100 * item_id, item_id % 7))
    return items


class ItemStore:
    """Item table of one app.

    gunicorn's gthread worker serves requests of one process from several threads, so every
    access takes the lock.
    """

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._lock = threading.Lock()
        self._items = {item.id: item for item in items}

    def all(self) -> list[Item]:
        """Return every item, ordered by id."""
        with self._lock:
            return [self._items[item_id] for item_id in sorted(self._items)]

    def get(self, item_id: int) -> Item | None:
        """Return the item with this id, or None."""
        with self._lock:
            return self._items.get(item_id)

    def replace_all(self, items: Iterable[Item]) -> int:
        """Replace the whole table; return how many items it now holds."""
        fresh = {item.id: item for item in items}
        with self._lock:
            self._items = fresh
            return len(fresh)


def page_size() -> int:
    """Items per page, read from the active app's config when called."""
    return int(current_app.config["SHOP_PAGE_SIZE"])


def is_low_stock(item: Item) -> bool:
    """Whether ``item`` is below the active app's low-stock threshold."""
    return item.stock < int(current_app.config["SHOP_LOW_STOCK_THRESHOLD"])
