"""Context classes whose ``push``/``pop`` take other arguments get the generic wrappers.

Flask's ``push(self)`` and ``pop(self, exc=...)`` get wrappers shaped for them; any
other signature (a subclass or a later Flask that adds arguments) gets ``*args,
**kwargs`` wrappers. These tests give Flask's context classes such signatures and
check the generic wrappers see the same things the shaped ones do.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flask.ctx
import pytest
from flask import Flask, g

from ctxtrace import _agent

from .._support import Recorder

Shape = Callable[..., Any]


def _generic(original: Shape) -> Shape:
    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    del method.__wrapped__  # ``inspect.signature`` must see ``*args, **kwargs``
    return method


@pytest.fixture(params=["flask's own", "generic"])
def signatures(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with Flask's signatures, then with ``(self, *args, **kwargs)`` ones."""
    if request.param == "generic":
        # ``vars``: the merged Flask keeps a deprecated alias that warns when read.
        classes = [flask.ctx.AppContext, vars(flask.ctx).get("RequestContext")]
        for cls in (c for c in classes if c is not None):
            for name in ("push", "pop"):
                monkeypatch.setattr(cls, name, _generic(vars(cls)[name]))
    return str(request.param)


@pytest.fixture
def recorder(signatures: str, instrumented: Any) -> Iterator[Recorder]:
    recorder: Recorder = instrumented()
    yield recorder


def test_the_generic_wrappers_are_the_ones_installed(signatures: str, recorder: Recorder) -> None:
    """With other signatures every context method gets a ``*args`` wrapper."""
    agent = _agent.current()
    assert agent is not None
    wrappers = [
        patch.replacement for patch in agent.hooks.patches if patch.attr in ("push", "pop")
    ]
    assert wrappers
    generic = [w for w in wrappers if w.__code__.co_flags & 0x04]  # CO_VARARGS
    assert len(generic) == (len(wrappers) if signatures == "generic" else 0)


def test_healthy_requests_and_pairs_report_nothing(recorder: Recorder, app: Flask) -> None:
    """Requests, nested pairs and a thread's own context: no anomaly with either shape."""
    client = app.test_client()
    for _ in range(3):
        assert client.get("/").data == b"ok"
    with app.app_context(), app.test_request_context("/"):
        g.x = 1
    def in_a_thread() -> None:
        with app.app_context():
            g.y = 2

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert recorder.names() == []
    agent = _agent.current()
    assert agent is not None
    assert {s.kind: s.pushes for s in agent.snapshot() if s.pushes} == {
        s.kind: s.pops for s in agent.snapshot() if s.pops
    }


@pytest.mark.leaks_on_purpose
def test_a_wrong_pop_and_a_leak_are_found(recorder: Recorder, app: Flask) -> None:
    """The generic wrappers find a wrong pop and a thread's leak as the shaped ones do."""
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()
    # Flask <= 3.1 pops and then asserts; the merged Flask refuses with a RuntimeError.
    with pytest.raises((AssertionError, RuntimeError)):
        outer.pop()
    leaker = threading.Thread(target=lambda: app.app_context().push(), name="leaker")
    leaker.start()
    leaker.join()
    assert sorted(recorder.names()) == ["leaked", "wrong_pop"]
    assert recorder.anomalies("leaked")[0].reason == "unit_end"
