"""What the Celery and RQ tests share: a real Redis server per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .._servers import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of its own on a free 127.0.0.1 port, stopped after the module."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
