"""Flask hooks: wrappers on the context classes, the WSGI entry and the proxies.

This layer knows Flask and nothing else. Each wrapper calls the original exactly
once and returns or raises exactly what it did; everything ctxtrace does around
that call sits in ``try``/``except`` clauses that hand errors to the guard, so a
bug here can never reach the application. On the success path the wrappers do
the minimum: read Flask's push count, classify the caller, tell the ledger.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, Final

import flask
import flask.app
import flask.ctx
import flask.globals
import flask.helpers
import werkzeug.local

from . import _sites, _units
from ._events import Kind, Phase, Site
from ._flaskshape import FlaskShape
from ._guard import InternalErrors
from ._ledger import Ledger
from ._patching import Patch

# Marks a request unit whose dispatch push is under way.
DISPATCHING: Final = object()
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME: Final = 120


class Hooks:
    """Builds, applies and removes every patch for one agent."""

    def __init__(
        self,
        ledger: Ledger,
        shape: FlaskShape,
        errors: InternalErrors,
        *,
        repair: bool,
        suppressed: Callable[[Site | None], bool] | None,
        detect_access: bool,
    ) -> None:
        self.ledger = ledger
        self.shape = shape
        self.errors = errors
        self.repair = repair
        self.suppressed = suppressed
        self.detect_access = detect_access
        self.active = True
        self.patches: list[Patch] = []
        self._names: dict[str, str] = {}
        self._stats_cache: dict[str, dict[Any, Any]] = {"app": {}, "request": {}}
        self._lookup_codes = {
            werkzeug.local._ProxyLookup.__get__.__code__,
            werkzeug.local._ProxyLookup.__call__.__code__,
        }

    # -- installing ---------------------------------------------------------

    def install(self) -> None:
        """Apply every patch, or none: a failure part-way takes back what was done."""
        shape = self.shape
        _sites.mark(_stream_generator_code(), _sites.STREAM)
        # Before the merge the class says the kind; after it, only the context does.
        classes: list[tuple[type[Any], Kind | None]] = [
            (shape.app_context, None if shape.merged else "app")
        ]
        if shape.request_context is not None:
            classes.append((shape.request_context, "request"))
        planned = [
            Patch(cls, name, factory(vars(cls)[name], kind))
            for cls, kind in classes
            for name, factory in (("push", self._wrap_push), ("pop", self._wrap_pop))
        ]
        call = vars(flask.Flask)["__call__"]
        planned.append(Patch(flask.Flask, "__call__", self._wrap_call(call)))
        if self.detect_access:
            for name, proxy in _proxies():
                original = object.__getattribute__(proxy, "_get_current_object")
                wrapper = self._wrap_lookup(original, name)
                planned.append(Patch(proxy, "_get_current_object", wrapper, slot=True))
        done: list[Patch] = []
        try:
            for patch in planned:
                patch.apply()
                done.append(patch)
        except BaseException:
            for patch in reversed(done):
                patch.revert()
            raise
        self.patches = done

    def uninstall(self) -> None:
        """Put back every original that is still ours; wrappers left inside others go inert."""
        self.active = False
        for patch in reversed(self.patches):
            patch.revert()
        self.patches = []

    # -- names ------------------------------------------------------------

    def app_name(self, app: Any) -> str:
        """The app's name, made safe for telemetry (no control characters, bounded)."""
        raw = app.name
        name = self._names.get(raw)
        if name is None:
            name = _CONTROL.sub("?", str(raw))[:_MAX_NAME] or "?"
            if len(self._names) < 256:
                self._names[raw] = name
        return name

    def describe(self, ctx: Any) -> tuple[Kind, str]:
        try:
            return self.shape.kind(ctx), self.app_name(ctx.app)
        except Exception:
            return "app", "?"

    # -- wrappers -----------------------------------------------------------

    def _stats(self, ctx: Any, kind: Kind) -> Any:
        """The ledger's counters for a context's (kind, app), cached per app (slow path)."""
        app = ctx.app
        cache = self._stats_cache[kind]
        stats = cache.get(app)
        if stats is None:
            stats = self.ledger.stats_for(kind, self.app_name(app))
            if len(cache) < 256:
                cache[app] = stats
        return stats

    def _wrap_push(
        self, original: Callable[..., Any], fixed_kind: Kind | None
    ) -> Callable[..., Any]:
        """Wrap ``push``; ``fixed_kind`` is set when the class alone says the kind (Flask <= 3.1).

        Flask's own pushes while dispatching are recognised from the unit of
        work, not from the stack: looking at frames costs about a microsecond
        inside a request (CPython must materialise them), so only pushes by
        user code pay for finding their line. The first request context pushed
        in a request unit is the dispatch; an app context pushed while that
        push is under way is the one Flask <= 3.1 pushes for it.
        """
        hooks = self
        ledger = self.ledger
        ledger_push = ledger.push
        current_unit = ledger.current_unit
        kind_of = self.shape.kind
        slot = self.shape.slot(fixed_kind or "app")
        caller = _sites.caller
        user = _sites.USER
        suppressed = self.suppressed
        caches = self._stats_cache

        def push(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not hooks.active:
                return original(self, *args, **kwargs)
            try:
                kind = fixed_kind or kind_of(self)
                unit = current_unit()
                dispatch = (
                    kind == "request"
                    and unit is not None
                    and unit.dispatch is None
                    and unit.kind == "request"
                )
                if dispatch and unit is not None:
                    unit.dispatch = DISPATCHING
            except Exception as exc:
                hooks.errors.record("hooks", exc)
                return original(self, *args, **kwargs)
            try:
                result = original(self, *args, **kwargs)
            except BaseException:
                if dispatch and unit is not None:
                    unit.dispatch = None
                raise
            try:
                stats = caches[kind].get(self.app) or hooks._stats(self, kind)
                if dispatch and unit is not None:
                    unit.dispatch = self
                    ledger_push(self, stats, slot, None)
                    ledger.dispatched(
                        self,
                        _sites.endpoint_site(hooks.shape.endpoint(self) or "<unmatched>"),
                        hooks.shape.implicit_app_context(self),
                    )
                elif unit is not None and unit.dispatch is DISPATCHING:
                    ledger_push(self, stats, slot, None)
                else:
                    klass, site = caller(2)
                    if klass == user:
                        if suppressed is None or not suppressed(site):
                            ledger_push(self, stats, slot, site)
                    else:
                        ledger_push(self, stats, slot, None, klass == _sites.STREAM)
            except Exception as exc:
                hooks.errors.record("hooks", exc)
            return result

        _copy_names(push, original)
        return push

    def _wrap_pop(
        self, original: Callable[..., Any], fixed_kind: Kind | None
    ) -> Callable[..., Any]:
        hooks = self
        ledger_pop = self.ledger.pop
        count = self.shape.push_count
        slot = self.shape.slot(fixed_kind or "app")

        def pop(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not hooks.active:
                return original(self, *args, **kwargs)
            try:
                before = count(self)
            except Exception as exc:
                hooks.errors.record("hooks", exc)
                return original(self, *args, **kwargs)
            try:
                return original(self, *args, **kwargs)
            finally:
                try:
                    ledger_pop(self, slot, before, count(self))
                except Exception as exc:
                    hooks.errors.record("hooks", exc)

        _copy_names(pop, original)
        return pop

    def _wrap_call(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``Flask.__call__`` is the unit of work for a request: it encloses middleware."""
        hooks = self

        def __call__(self: Any, environ: Any, start_response: Any) -> Any:
            if not hooks.active:
                return original(self, environ, start_response)
            try:
                unit, token = hooks.ledger.begin_unit("request", "request", check_stale=False)
            except Exception as exc:
                hooks.errors.record("hooks", exc)
                return original(self, environ, start_response)
            try:
                return original(self, environ, start_response)
            finally:
                hooks._end_unit(unit, token)

        _copy_names(__call__, original)
        return __call__

    def _end_unit(self, unit: Any, token: Any) -> None:
        try:
            leftovers = self.ledger.end_unit(unit, token, repair=self.repair)
        except Exception as exc:
            self.errors.record("hooks", exc)
            return
        for ctx in leftovers:
            self._repair(ctx)

    def _repair(self, ctx: Any) -> None:
        """Pop a leaked context as its owner should have (only with ``repair`` on)."""
        try:
            while self.shape.push_count(ctx) > 0:
                ctx.pop()
        except Exception as exc:
            self.errors.record("repair", exc)

    def end_unit(self, unit: Any, token: Any) -> None:
        """For integrations (tasks, commands, threads) that run their own units."""
        self._end_unit(unit, token)

    def _wrap_lookup(self, original: Callable[[], Any], proxy: str) -> Callable[[], Any]:
        hooks = self

        def _get_current_object() -> Any:
            try:
                return original()
            except RuntimeError as exc:
                if hooks.active:
                    try:
                        hooks._failed_lookup(proxy, exc)
                    except Exception as internal:
                        hooks.errors.record("hooks", internal)
                raise

        return _get_current_object

    def _failed_lookup(self, proxy: str, exc: RuntimeError) -> None:
        caller = _caller_frame(3)
        if caller is not None and caller.f_code in self._lookup_codes:
            lookup = caller.f_locals.get("self")
            if getattr(lookup, "fallback", None) is not None:
                # werkzeug answers this lookup itself (bool(current_app) is False).
                return
        _, site = _sites.caller(3)
        if self.suppressed is not None and self.suppressed(site):
            return
        phase: Phase = "import" if _sites.is_import_time(3) else "runtime"
        self.ledger.access(proxy, site, phase, exc, parent_unit=_units.started_by.get())


def _caller_frame(depth: int) -> Any:
    try:
        return sys._getframe(depth)
    except ValueError:
        return None


def _proxies() -> Iterable[tuple[str, Any]]:
    """The proxy objects user modules hold (they imported these very objects)."""
    namespace = vars(flask.globals)
    for name in ("current_app", "g", "request", "session", "app_ctx", "request_ctx"):
        proxy = namespace.get(name)
        if isinstance(proxy, werkzeug.local.LocalProxy):
            yield name, proxy


def _stream_generator_code() -> Any:
    """The code object of the generator ``stream_with_context`` pushes from."""
    for const in flask.helpers.stream_with_context.__code__.co_consts:
        if getattr(const, "co_name", None) == "generator":
            return const
    return flask.helpers.stream_with_context.__code__


def _copy_names(wrapper: Callable[..., Any], original: Callable[..., Any]) -> None:
    """Keep the wrapped method's identity for introspection, without functools overhead."""
    wrapper.__name__ = getattr(original, "__name__", wrapper.__name__)
    wrapper.__qualname__ = getattr(original, "__qualname__", wrapper.__qualname__)
    wrapper.__doc__ = original.__doc__
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
