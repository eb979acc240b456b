"""Flask hooks: wrappers on the context classes, the WSGI entry and the proxies.

This layer knows Flask and nothing else. Each wrapper calls the original exactly
once and returns or raises exactly what it did; everything ctxtrace does around
that call sits in ``try``/``except`` clauses that hand errors to the guard, so a
bug here can never reach the application.

The wrappers run on every request, so they are built for it: what they need is
bound into closure locals when they are made, they take Flask's own signatures
(``push(self)``, ``pop(self, exc=...)``; an unknown signature gets a generic
wrapper), and they decide from Flask's own state. A pop of the context on top of
Flask's stack is healthy and takes the short way; only a pop of anything else
goes through the ledger's checks. The contexts Flask pushes to dispatch a
request are recognised from the request's unit of work, not from frames: looking
at frames costs about a microsecond inside a request (CPython must materialise
them), so only pushes by user code pay for finding their line.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import flask
import flask.app
import flask.ctx
import flask.globals
import flask.helpers
import werkzeug.local

from ctxtrace._events import Kind, Phase, Site
from ctxtrace.core import sites, units
from ctxtrace.core.flaskshape import FlaskShape
from ctxtrace.core.guard import InternalErrors
from ctxtrace.core.ledger import Ledger
from ctxtrace.core.names import safe_name
from ctxtrace.core.patching import Patch, copy_names
from ctxtrace.core.records import DISPATCHING, FINISHED, UnitState

_MAX_CACHED_APPS: Final = 256
# Frames between ``_failed_lookup`` and the code that touched the proxy: through
# a wrapper around the lookup, or through werkzeug's own lookup (see ``_with_failure_hook``).
_ABOVE_WRAPPER: Final = 3
_ABOVE_CLONE: Final = 4
# On Flask's next release ``request`` and ``session`` read the app stack and raise
# from the context itself when it carries no request: only a wrapper sees that.
_REQUEST_PROXIES: Final = frozenset(("request", "session"))
_CALL_OPS: Final = frozenset(("PRECALL", "CALL", "CALL_FUNCTION"))


@dataclass(frozen=True, slots=True)
class _AfterPush:
    """What a push wrapper does once Flask's push returned; each guards its own errors."""

    tracked: Callable[[Any, Any], None]
    dispatched: Callable[[Any, Any], None]
    for_request: Callable[[Any, Any], None]


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
        # Compared by identity: hashing a code object hashes its whole contents.
        self._lookup_get = werkzeug.local._ProxyLookup.__get__.__code__
        self._lookup_call = werkzeug.local._ProxyLookup.__call__.__code__

    # -- installing ---------------------------------------------------------

    def install(self) -> None:
        """Apply every patch, or none: a failure part-way takes back what was done."""
        shape = self.shape
        sites.mark(_stream_generator_code(), sites.STREAM)
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
        for name in ("__call__", "wsgi_app"):
            original = vars(flask.Flask)[name]
            planned.append(Patch(flask.Flask, name, self._wrap_call(original)))
        if self.detect_access:
            for name, proxy in _proxies():
                original = object.__getattribute__(proxy, "_get_current_object")
                hooked = self._hook_lookup(original, name)
                planned.append(Patch(proxy, "_get_current_object", hooked, slot=True))
            # Where ``from flask import copy_current_request_context`` finds it
            # from now on; a module that imported it before keeps Flask's own.
            copier = self._wrap_copier(vars(flask.ctx)["copy_current_request_context"])
            planned += [
                Patch(module, "copy_current_request_context", copier)
                for module in (flask.ctx, flask)
            ]
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
        # A view's error that Flask turns into a 500 never leaves ``wsgi_app``:
        # Flask's own signal says it escaped the request.
        flask.got_request_exception.connect(self._request_failed, weak=False)

    def _request_failed(self, sender: object, exception: BaseException, **_: object) -> None:
        self.escaped(exception)

    def escaped(self, exc: BaseException) -> None:
        """``exc`` failed the running unit of work (a 500, a failed task or command)."""
        if self.active:
            try:
                self.ledger.escaped(exc)
            except Exception as internal:
                self.errors.record("hooks", internal)

    def uninstall(self) -> None:
        """Put back every original that is still ours; wrappers left inside others go inert."""
        self.active = False
        flask.got_request_exception.disconnect(self._request_failed)
        for patch in reversed(self.patches):
            patch.revert()
        self.patches = []

    # -- names ------------------------------------------------------------

    def app_name(self, app: Any) -> str:
        """The app's name, made safe for telemetry (no control characters, bounded)."""
        raw = app.name
        name = self._names.get(raw)
        if name is None:
            name = safe_name(raw)
            if len(self._names) < _MAX_CACHED_APPS:
                self._names[raw] = name
        return name

    def describe(self, ctx: Any) -> tuple[Kind, str]:
        try:
            return self.shape.kind(ctx), self.app_name(ctx.app)
        except Exception:
            return "app", "?"

    def _stats(self, ctx: Any, kind: Kind) -> Any:
        """The ledger's counters for a context's (kind, app), cached per app (slow path)."""
        app = ctx.app
        cache = self._stats_cache[kind]
        stats = cache.get(app)
        if stats is None:
            stats = self.ledger.stats_for(kind, self.app_name(app))
            if len(cache) < _MAX_CACHED_APPS:
                cache[app] = stats
        return stats

    # -- pushes -------------------------------------------------------------

    def _wrap_push(
        self, original: Callable[..., Any], fixed_kind: Kind | None
    ) -> Callable[..., Any]:
        """Wrap ``push``; ``fixed_kind`` is set when the class alone says the kind (Flask <= 3.1).

        The first request context pushed in a request unit is its dispatch; an
        app context pushed while that push is under way is the one Flask <= 3.1
        pushes for it. Both are handed to the ledger as the request's own; every
        other push is tracked, with the line of user code that made it.
        """
        after = self._after_push(fixed_kind)
        if not _takes_only_self(original):
            wrapper = self._push_any(original, fixed_kind, after)
        elif fixed_kind == "app":
            wrapper = self._push_app(original, after)
        else:
            wrapper = self._push_dispatching(original, fixed_kind, after)
        copy_names(wrapper, original)
        return wrapper

    def _after_push(self, fixed_kind: Kind | None) -> _AfterPush:
        """What a push wrapper does once Flask's push returned, by what the push was."""
        return _AfterPush(
            self._tracking_step(fixed_kind), self._dispatch_step(), self._implicit_step()
        )

    def _tracking_step(self, fixed_kind: Kind | None) -> Callable[[Any, Any], None]:
        hooks = self
        errors = self.errors
        ledger_push = self.ledger.push
        kind_of = self.shape.kind
        slot = self.shape.slot(fixed_kind or "app")
        caller = sites.caller
        user = sites.USER
        stream = sites.STREAM
        suppressed = self.suppressed
        caches = self._stats_cache

        def tracked(ctx: Any, unit: UnitState | None) -> None:
            """An ordinary push: tracked, with the user line that made it."""
            try:
                kind = fixed_kind or kind_of(ctx)
                stats = caches[kind].get(ctx.app) or hooks._stats(ctx, kind)
                # 0 is ``caller``, 1 this function, 2 the wrapper, 3 who called push.
                klass, site = caller(3)
                if klass == user:
                    if suppressed is None or not suppressed(site):
                        ledger_push(ctx, stats, slot, site, False, unit)
                else:
                    ledger_push(ctx, stats, slot, None, klass == stream, unit)
            except Exception as exc:
                errors.record("hooks", exc)

        return tracked

    def _dispatch_step(self) -> Callable[[Any, Any], None]:
        hooks = self
        errors = self.errors
        dispatch_pushed = self.ledger.dispatch_pushed
        endpoint_of = self.shape.endpoint
        request_stats = self._stats_cache["request"]
        app_stats = self._stats_cache["app"]

        def dispatched(ctx: Any, unit: UnitState) -> None:
            """The request's own context (and Flask's app context for it): named by its endpoint."""
            try:
                app = ctx.app
                stats = request_stats.get(app) or hooks._stats(ctx, "request")
                implicit = unit.dispatch_app is not None
                for_app = (app_stats.get(app) or hooks._stats(ctx, "app")) if implicit else None
                dispatch_pushed(unit, ctx, stats, for_app, endpoint_of(ctx))
            except Exception as exc:
                errors.record("hooks", exc)

        return dispatched

    def _implicit_step(self) -> Callable[[Any, Any], None]:
        hooks = self
        errors = self.errors
        dispatch_app_pushed = self.ledger.dispatch_app_pushed
        tracks_dispatch = self.ledger.tracks_dispatch
        app_stats = self._stats_cache["app"]

        def for_request(ctx: Any, unit: UnitState) -> None:
            """The app context Flask <= 3.1 pushes for the request it dispatches."""
            try:
                if tracks_dispatch:
                    stats = app_stats.get(ctx.app) or hooks._stats(ctx, "app")
                    dispatch_app_pushed(unit, ctx, stats)
                else:
                    # Counted with the request context, once that is pushed.
                    unit.app_pushed_for_dispatch(ctx)
            except Exception as exc:
                errors.record("hooks", exc)

        return for_request

    def _push_app(self, original: Callable[..., Any], after: _AfterPush) -> Callable[..., Any]:
        """``AppContext.push`` before the merge: tracked, unless pushed for a request."""
        hooks = self
        errors = self.errors
        slot_now = self.ledger.current_slot
        tracked = after.tracked
        for_request = after.for_request
        tracks_dispatch = self.ledger.tracks_dispatch

        def push(self: Any) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self)
            try:
                unit: UnitState | None = slot_now().unit
                pushed_for_request = unit is not None and unit.dispatch is DISPATCHING
            except Exception as exc:
                errors.record("hooks", exc)
                return original(self)
            result = original(self)
            if not pushed_for_request or unit is None:
                tracked(self, unit)
            elif tracks_dispatch:
                for_request(self, unit)
            else:
                # ``for_request`` and ``UnitState.app_pushed_for_dispatch``, inlined:
                # counted with the request context, once pushed.
                unit.dispatch_app = self
            return result

        return push

    def _push_dispatching(
        self, original: Callable[..., Any], fixed_kind: Kind | None, after: _AfterPush
    ) -> Callable[..., Any]:
        """A class whose contexts can carry a request: the first in a request unit dispatches."""
        hooks = self
        errors = self.errors
        slot_now = self.ledger.current_slot
        kind_of = self.shape.kind
        tracked = after.tracked
        hooks_stats = self._stats
        request_stats = self._stats_cache["request"]
        app_stats = self._stats_cache["app"]
        dispatch_pushed = self.ledger.dispatch_pushed
        # Where the request object sits: a request context's ``request`` before the
        # merge, an app context's ``_request`` after it.
        merged = fixed_kind is None

        def push(self: Any) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self)
            try:
                unit: UnitState | None = slot_now().unit
                dispatch = False
                if (
                    unit is not None
                    and unit.dispatch is None
                    and unit.kind == "request"
                    and (fixed_kind == "request" or kind_of(self) == "request")
                ):
                    unit.dispatch = DISPATCHING  # ``UnitState.begin_dispatch``, inlined
                    dispatch = True
            except Exception as exc:
                errors.record("hooks", exc)
                return original(self)
            if not dispatch or unit is None:
                result = original(self)
                tracked(self, unit)
                return result
            try:
                result = original(self)
            except BaseException:
                unit.undo_dispatch()
                raise
            # ``after.dispatched`` and ``FlaskShape.endpoint``, inlined: once per request.
            try:
                app = self.app
                try:
                    endpoint = (self._request if merged else self.request).url_rule.endpoint
                except AttributeError:
                    endpoint = None  # no rule matched
                dispatch_pushed(
                    unit,
                    self,
                    request_stats.get(app) or hooks_stats(self, "request"),
                    None
                    if unit.dispatch_app is None
                    else app_stats.get(app) or hooks_stats(self, "app"),
                    endpoint,
                )
            except Exception as exc:
                errors.record("hooks", exc)
            return result

        return push

    def _push_any(
        self, original: Callable[..., Any], fixed_kind: Kind | None, after: _AfterPush
    ) -> Callable[..., Any]:
        """For a ``push`` whose signature is not Flask's known ``push(self)``."""
        hooks = self
        errors = self.errors
        slot_now = self.ledger.current_slot
        kind_of = self.shape.kind
        app_only = fixed_kind == "app"

        def push(self: Any, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self, *args, **kwargs)
            try:
                unit: UnitState | None = slot_now().unit
                dispatching = unit is not None and unit.dispatch is DISPATCHING
                dispatch = False
                if (
                    not app_only
                    and unit is not None
                    and unit.dispatch is None
                    and unit.kind == "request"
                    and (fixed_kind == "request" or kind_of(self) == "request")
                ):
                    unit.begin_dispatch()
                    dispatch = True
            except Exception as exc:
                errors.record("hooks", exc)
                return original(self, *args, **kwargs)
            try:
                result = original(self, *args, **kwargs)
            except BaseException:
                if dispatch and unit is not None:
                    unit.undo_dispatch()
                raise
            if unit is None:
                after.tracked(self, unit)
            elif dispatch:
                after.dispatched(self, unit)
            elif app_only and dispatching:
                after.for_request(self, unit)
            else:
                after.tracked(self, unit)
            return result

        return push

    # -- pops ---------------------------------------------------------------

    def _wrap_pop(
        self, original: Callable[..., Any], fixed_kind: Kind | None
    ) -> Callable[..., Any]:
        """Wrap ``pop``: Flask's top of stack, read first, says whether the pop is healthy.

        A healthy pop (of the context on top) is told to the ledger after it. Any
        other pop first lets the ledger give the request's own contexts records
        (so its mirror holds the whole stack), and reports Flask's push counts
        around the pop, which tell whether Flask refused it.
        """
        slot = self.shape.slot(fixed_kind or "app")
        top_of_stack = self.shape.top_var(fixed_kind or "app").get
        if _takes_self_and_exc(original):
            wrapper = self._pop(original, slot, top_of_stack)
        else:
            wrapper = self._pop_any(original, slot, top_of_stack)
        copy_names(wrapper, original)
        return wrapper

    def _pop(
        self, original: Callable[..., Any], slot: str, top_of_stack: Callable[[Any], Any]
    ) -> Callable[..., Any]:
        """Flask's ``pop(self, exc=...)``; the default is passed on as is.

        After a healthy pop: a request's own context is marked popped on its
        unit (counted when the unit ends); the app context Flask <= 3.1 pushed
        for it needs nothing (it is counted with the request's); any other
        context needs the ledger only if it has a record.
        """
        hooks = self
        errors = self.errors
        ledger = self.ledger
        popped = ledger.popped
        records = ledger.records
        slot_now = ledger.current_slot
        ledger_pop = ledger.pop
        promote = ledger.promote_current
        count = self.shape.push_count
        exc_default = _exc_default(original)
        # Only contexts of this class can be a request's own (the first one it pushes).
        carries_requests = slot == ledger.request_slot

        def pop(self: Any, exc: Any = exc_default) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self, exc)
            try:
                healthy = top_of_stack(None) is self
                if not healthy:
                    promote()
                    before = count(self)
            except Exception as error:
                errors.record("hooks", error)
                return original(self, exc)
            if healthy:
                try:
                    return original(self, exc)
                finally:
                    try:
                        unit = slot_now().unit if carries_requests else None
                        if unit is not None and unit.dispatch is self:
                            # Counted when the unit ends (``Ledger.end_unit``);
                            # ``UnitState.end_dispatch``, inlined.
                            unit.dispatch = FINISHED
                        else:
                            entry = records.get(id(self))
                            if entry is not None:
                                popped(self, slot, entry)
                    except Exception as error:
                        errors.record("hooks", error)
            try:
                return original(self, exc)
            finally:
                try:
                    ledger_pop(self, slot, before, count(self))
                except Exception as error:
                    errors.record("hooks", error)

        return pop

    def _pop_any(
        self, original: Callable[..., Any], slot: str, top_of_stack: Callable[[Any], Any]
    ) -> Callable[..., Any]:
        """For a ``pop`` whose signature is not Flask's known one."""
        hooks = self
        errors = self.errors
        ledger = self.ledger
        count = self.shape.push_count

        def pop(self: Any, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self, *args, **kwargs)
            try:
                healthy = top_of_stack(None) is self
                if not healthy:
                    ledger.promote_current()
                before = count(self)
            except Exception as error:
                errors.record("hooks", error)
                return original(self, *args, **kwargs)
            try:
                return original(self, *args, **kwargs)
            finally:
                try:
                    unit = ledger.current_unit()
                    if not healthy:
                        ledger.pop(self, slot, before, count(self))
                    elif unit is not None and unit.dispatch is self:
                        unit.end_dispatch()
                    else:
                        entry = ledger.records.get(id(self))
                        if entry is not None:
                            ledger.popped(self, slot, entry)
                except Exception as error:
                    errors.record("hooks", error)

        return pop

    # -- units of work ------------------------------------------------------

    def _wrap_call(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``Flask.__call__`` and ``Flask.wsgi_app``: a request is a unit of work.

        ``__call__`` encloses any middleware put around ``app.wsgi_app``; the
        ``wsgi_app`` it reaches then joins that unit. ``wsgi_app`` called
        directly (test harnesses, some servers' embedding) begins one itself.
        (Calling Flask's ``wsgi_app`` straight from the ``__call__`` wrapper
        would save two frames, but tracebacks would then lack ``__call__``.)
        """
        hooks = self
        errors = self.errors
        begin_request = self.ledger.begin_request
        slot_now = self.ledger.current_slot
        end_request = self.ledger.end_request
        leave_unit = self.ledger.leave_unit
        repair = self.repair

        def wrapper(self: Any, environ: Any, start_response: Any) -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            if not hooks.active:
                return original(self, environ, start_response)
            try:
                outer: UnitState | None = slot_now().unit
                if outer is not None and outer.dispatch is None and outer.kind == "request":
                    unit = None  # the request's unit has begun, nothing dispatched yet
                else:
                    unit = begin_request()
            except Exception as exc:
                errors.record("hooks", exc)
                return original(self, environ, start_response)
            if unit is None:
                return original(self, environ, start_response)
            try:
                return original(self, environ, start_response)
            except BaseException as exc:
                hooks.escaped(exc)
                raise
            finally:
                try:
                    if hooks.active:
                        leftovers = end_request(unit, repair)
                    else:
                        # Switched off mid-request: its pops went to Flask alone,
                        # so judging the unit would report leaks that are not there.
                        leftovers = []
                        leave_unit(unit)
                except Exception as exc:
                    errors.record("hooks", exc)
                else:
                    for ctx in leftovers:
                        hooks._repair(ctx)

        copy_names(wrapper, original)
        return wrapper

    def end_unit(self, unit: UnitState) -> None:
        """End a unit of work; with ``repair`` on, pop what it leaked."""
        try:
            leftovers = self.ledger.end_unit(unit, repair=self.repair)
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

    # -- proxies ------------------------------------------------------------

    def _hook_lookup(self, original: Callable[[], Any], proxy: str) -> Callable[[], Any]:
        """What replaces a proxy's lookup: werkzeug's own code where possible.

        A successful lookup is the hottest path of all (every ``g``, ``request``
        and ``current_app`` use), so ctxtrace keeps out of it: the replacement
        runs werkzeug's very code object, in which only the name ``RuntimeError``
        is bound to a function that records the failure and builds the same
        error. Where the lookup has another shape, or can fail inside the
        context itself (``request`` on Flask's next release), a plain wrapper.
        """
        if not (self.shape.merged and proxy in _REQUEST_PROXIES):
            hooks = self

            def runtime_error(*args: Any) -> RuntimeError:
                error = RuntimeError(*args)
                if hooks.active:
                    try:
                        hooks._failed_lookup(proxy, error, _ABOVE_CLONE)
                    except Exception as internal:
                        hooks.errors.record("hooks", internal)
                return error

            clone = _with_failure_hook(original, runtime_error)
            if clone is not None:
                return clone
        return self._wrap_lookup(original, proxy)

    def _wrap_lookup(self, original: Callable[[], Any], proxy: str) -> Callable[[], Any]:
        hooks = self

        def _get_current_object() -> Any:
            __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
            try:
                return original()
            except RuntimeError as exc:
                if hooks.active:
                    try:
                        hooks._failed_lookup(proxy, exc, _ABOVE_WRAPPER)
                    except Exception as internal:
                        hooks.errors.record("hooks", internal)
                raise

        copy_names(_get_current_object, original)
        return _get_current_object

    def _wrap_copier(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``copy_current_request_context`` applied with no request to copy (in the
        pool task rather than before submitting it) is an access to the request context."""
        hooks = self

        def copy_current_request_context(f: Any) -> Any:
            try:
                return original(f)
            except RuntimeError as exc:
                if hooks.active:
                    try:
                        hooks._failed_lookup("request_ctx", exc, _ABOVE_WRAPPER)
                    except Exception as internal:
                        hooks.errors.record("hooks", internal)
                raise

        copy_names(copy_current_request_context, original)
        return copy_current_request_context

    def _failed_lookup(self, proxy: str, exc: RuntimeError, above: int) -> None:
        """A lookup failed; ``above`` frames up from here is the code that made it."""
        caller = _caller_frame(above)
        code = caller.f_code if caller is not None else None
        if code is self._lookup_get or code is self._lookup_call:
            lookup = caller.f_locals.get("self")
            if getattr(lookup, "fallback", None) is not None:
                # werkzeug answers this lookup itself (bool(current_app) is False).
                return
        _, site = sites.caller(above, caller)
        if self.suppressed is not None and self.suppressed(site):
            return
        phase: Phase = "import" if sites.is_import_time(above) else "runtime"
        self.ledger.access(proxy, site, phase, exc, parent_unit=units.started_by.get())


def _with_failure_hook(
    lookup: Callable[[], Any], runtime_error: Callable[..., RuntimeError]
) -> Callable[[], Any] | None:
    """werkzeug's lookup function again, its ``RuntimeError`` name bound to ``runtime_error``.

    Same code object and closure, so a successful lookup runs exactly what it
    ran before. Only for a plain function whose globals it uses are builtins and
    which only ever calls ``RuntimeError`` (never catches or compares it);
    otherwise ``None``, and the caller wraps the lookup instead.
    """
    if not isinstance(lookup, types.FunctionType):
        return None
    code = lookup.__code__
    module = lookup.__globals__
    others = [name for name in code.co_names if name != "RuntimeError"]
    if "RuntimeError" not in code.co_names or any(name in module for name in others):
        return None
    if not _only_calls(code, "RuntimeError"):
        return None
    namespace = {
        "__builtins__": module.get("__builtins__", builtins),
        "__name__": module.get("__name__"),
        "RuntimeError": runtime_error,
    }
    clone = types.FunctionType(
        code, namespace, lookup.__name__, lookup.__defaults__, lookup.__closure__
    )
    clone.__kwdefaults__ = lookup.__kwdefaults__
    copy_names(clone, lookup)
    return clone


def _only_calls(code: types.CodeType, name: str) -> bool:
    """Whether every load of global ``name`` in ``code`` is called (and nothing else)."""
    instructions = list(dis.get_instructions(code))
    for index, instruction in enumerate(instructions):
        if instruction.opname != "LOAD_GLOBAL" or not str(instruction.argval).endswith(name):
            continue
        following = (i.opname for i in instructions[index + 1 :])
        first_other = next((op for op in following if not op.startswith("LOAD_")), None)
        if first_other not in _CALL_OPS:
            return False
    return True


def _takes_only_self(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is ``def f(self)``, so a wrapper can skip ``*args`` packing."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 1 and parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def _takes_self_and_exc(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is ``def f(self, exc=<default>)`` (Flask's ``pop``)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return (
        len(parameters) == 2
        and all(p.kind is positional for p in parameters)
        and parameters[1].name == "exc"
        and parameters[1].default is not inspect.Parameter.empty
    )


def _exc_default(function: Callable[..., Any]) -> Any:
    """The default of ``pop``'s ``exc``: passed on as is, Flask sees what it would have."""
    defaults = getattr(function, "__defaults__", None)
    return defaults[-1] if defaults else None


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


