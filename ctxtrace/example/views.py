"""The shop's healthy endpoints.

They use the context-bound parts of Flask the documented way: ``g`` filled by a URL value
preprocessor, ``url_for`` for links, config read at call time, and ``stream_with_context`` for a
body that is produced after the view has returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, request, stream_with_context, url_for

from .extension import inventory
from .models import Item, is_low_stock, page_size

bp = Blueprint("shop", __name__)


def _item_json(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "price_cents": item.price_cents,
        "stock": item.stock,
        "low_stock": is_low_stock(item),
        "url": url_for("shop.show_item", item_id=item.id),
    }


@bp.url_value_preprocessor
def _load_item(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # Loading the item here keeps the 404 in one place for every /items/<id> route.
    if values is not None and "item_id" in values:
        item = inventory.session().get(values.pop("item_id"))
        if item is None:
            abort(404)
        g.item = item


@bp.get("/")
def index() -> dict[str, Any]:
    """Service overview; ``open_inventory_sessions`` above 0 at rest means a leaked context."""
    return {
        "app": current_app.name,
        "links": {"items": url_for(".list_items"), "stream": url_for(".stream_items")},
        "open_inventory_sessions": inventory.open_sessions(),
    }


@bp.get("/items")
def list_items() -> dict[str, Any]:
    """First page of items."""
    items = inventory.session().all()[: page_size()]
    return {"items": [_item_json(item) for item in items]}


@bp.get("/items/<int:item_id>")
def show_item() -> dict[str, Any]:
    """One item, loaded into ``g`` by the URL value preprocessor."""
    item: Item = g.item
    return {"item": _item_json(item), "links": {"collection": url_for(".list_items")}}


@bp.get("/stream")
def stream_items() -> Response:
    """All items as CSV, streamed; ``?low_stock=1`` keeps only items low on stock.

    The generator runs after this view has returned and Flask has popped the request's
    context; ``stream_with_context`` pushes it again around the generator so ``request`` and
    the config stay readable while the body is produced.
    """

    def rows() -> Iterator[str]:
        only_low = request.args.get("low_stock") == "1"
        yield "id,name,stock,low_stock\n"
        for item in inventory.session().all():
            low = is_low_stock(item)
            if low or not only_low:
                yield f"{item.id},{item.name},{item.stock},{int(low)}\n"

    return Response(stream_with_context(rows()), mimetype="text/csv")
