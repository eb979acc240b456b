"""What the integrations share: waiting for an import, the worker role, the flush bound.

Celery and RQ cost 70-130 ms to import, so ctxtrace never imports them itself:
their integrations wait for the application to import them (``on_import``) and
hook them right after the module body has run.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ctxtrace._host import Host

Remover = Callable[[], None]

#: How long a unit end may wait for the emitters to hand over what they buffer
#: (RQ work-horses and Celery pool processes, which exit without running atexit).
FLUSH_TIMEOUT_S: Final = 5.0


def tell_escaped(host: Host, exc: BaseException, component: str) -> None:
    """Tell the host that ``exc`` is failing the running unit (never raises)."""
    try:
        if host.running:
            host.escaped(exc)
    except Exception as internal:
        host.errors.record(component, internal)


# -- waiting for a module to be imported --------------------------------------


class _Watcher(importlib.abc.MetaPathFinder):
    """A finder that never finds anything itself: it tells us when a module has loaded."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.callbacks:
            return None
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                find(fullname, path, target) if find is not None else None
            )
            if spec is not None:
                loader = spec.loader
                if loader is not None and hasattr(loader, "exec_module"):
                    spec.loader = _NotifyingLoader(loader, self._loaded)
                return spec
        return None

    def _loaded(self, module: ModuleType) -> None:
        with _lock:
            callbacks = self.callbacks.pop(module.__name__, [])
            _forget_watcher_if_idle()
        for callback in callbacks:
            callback(module)


class _NotifyingLoader(importlib.abc.Loader):
    """Runs the real loader, then hands the finished module to the watcher."""

    def __init__(self, loader: Any, loaded: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._loaded = loaded

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps the real loader: nothing of ours stays visible in it.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._loaded(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


_lock = threading.RLock()
_watcher: _Watcher | None = None


def _forget_watcher_if_idle() -> None:
    global _watcher
    if _watcher is not None and not _watcher.callbacks:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_watcher)
        _watcher = None


def on_import(
    name: str, hook: Callable[[ModuleType], Remover], errors: Callable[[BaseException], None]
) -> Remover:
    """Run ``hook(module)`` once ``name`` is imported (now, if it already is).

    ``hook`` returns its own remover. The returned function cancels the wait or,
    if the hook ran, calls that remover. An error in ``hook`` goes to ``errors``,
    never into the application's import.
    """
    global _watcher
    state: dict[str, Remover] = {}

    def run(module: ModuleType) -> None:
        try:
            state["remove"] = hook(module)
        except Exception as exc:
            errors(exc)

    with _lock:
        module = sys.modules.get(name)
        if module is None:
            if _watcher is None:
                _watcher = _Watcher()
                sys.meta_path.insert(0, _watcher)
            _watcher.callbacks.setdefault(name, []).append(run)
    if module is not None:
        run(module)

    def remove() -> None:
        with _lock:
            if _watcher is not None and run in _watcher.callbacks.get(name, []):
                _watcher.callbacks[name].remove(run)
                if not _watcher.callbacks[name]:
                    del _watcher.callbacks[name]
                _forget_watcher_if_idle()
        undo = state.pop("remove", None)
        if undo is not None:
            undo()

    return remove
