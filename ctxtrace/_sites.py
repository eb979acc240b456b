"""Finding the line of user code responsible for a push or an access.

The walk runs on every push, so it is built to be cheap: each code object is
classified once (library, user, Flask's own dispatch, a streaming generator) and
the answer cached; the walk itself is a few dictionary lookups. ``Site``
objects are cached per code object and line, so a hot push site allocates
nothing after its first use.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import CodeType, FrameType
from typing import Final

import click
import flask
import werkzeug

from ._events import Site

USER: Final = 0
LIBRARY: Final = 1
STREAM: Final = 2


def _package_dir(module_file: str | None) -> str:
    return os.path.dirname(os.path.abspath(module_file or "")) + os.sep


# The packages whose frames are never the culprit: Flask and the libraries it
# calls through, and ctxtrace itself. click is here because `flask` CLI pushes
# go through it before reaching the user's command.
_LIBRARY_DIRS: Final = tuple(
    _package_dir(m.__file__) for m in (flask, werkzeug, click, sys.modules[__package__])
)
_LIBRARY_FILES: Final = (os.path.abspath(contextlib.__file__),)
# The example shop ships inside the package but is application code: its frames
# are the culprits that `ctxtrace demo` points at.
_USER_DIRS: Final = (os.path.join(_LIBRARY_DIRS[-1], "example") + os.sep,)

_classes: dict[CodeType, int] = {}
_sites: dict[CodeType, dict[int, Site]] = {}
_endpoint_sites: dict[str, Site] = {}
_MAX_CACHED: Final = 4096
_lock = threading.Lock()


def mark(code: CodeType, klass: int) -> None:
    """Pin the class of a code object (Flask's stream helper)."""
    _classes[code] = klass


def _classify(code: CodeType) -> int:
    path = code.co_filename
    if path.startswith("<frozen importlib"):
        klass = LIBRARY
    else:
        absolute = os.path.abspath(path) if not path.startswith("<") else path
        library = (
            absolute.startswith(_LIBRARY_DIRS) and not absolute.startswith(_USER_DIRS)
        ) or absolute in _LIBRARY_FILES
        klass = LIBRARY if library else USER
    if len(_classes) < _MAX_CACHED:
        _classes[code] = klass
    return klass


def site_of(frame: FrameType) -> Site:
    """The (cached) site for the line a frame is executing."""
    code, line = frame.f_code, frame.f_lineno
    lines = _sites.get(code)
    if lines is not None:
        site = lines.get(line)
        if site is not None:
            return site
    site = Site(
        file=code.co_filename,
        line=line,
        function=getattr(code, "co_qualname", code.co_name),
        module=str(frame.f_globals.get("__name__", "")),
    )
    with _lock:
        if len(_sites) < _MAX_CACHED:
            _sites.setdefault(code, {})[line] = site
    return site


def endpoint_site(endpoint: str) -> Site:
    """The site used for contexts Flask pushes itself while dispatching."""
    site = _endpoint_sites.get(endpoint)
    if site is None:
        site = Site(file="", line=0, function="", endpoint=endpoint)
        if len(_endpoint_sites) < _MAX_CACHED:
            _endpoint_sites[endpoint] = site
    return site


def caller(depth: int) -> tuple[int, Site | None]:
    """Classify the first interesting frame from ``depth`` up and return its site.

    ``depth`` counts from this function's own frame (0), as ``sys._getframe`` does.

    Returns ``(USER, site)`` for user code, ``(STREAM, None)`` when a streaming
    response is pushing, and ``(LIBRARY, None)`` when every frame is library code.
    """
    frame: FrameType | None = sys._getframe(depth)
    classes = _classes
    while frame is not None:
        code = frame.f_code
        klass = classes.get(code)
        if klass is None:
            klass = _classify(code)
        if klass == USER:
            # The cache hit is inlined: this runs on every push.
            lines = _sites.get(code)
            site = lines.get(frame.f_lineno) if lines is not None else None
            return USER, site if site is not None else site_of(frame)
        if klass != LIBRARY:
            return klass, None
        frame = frame.f_back
    return LIBRARY, None


def is_import_time(depth: int) -> bool:
    """Whether module-level code of a module being imported is on the stack."""
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            back = frame.f_back
            # A module body run by the import system, not the script's own __main__.
            if back is not None and back.f_code.co_filename.startswith("<frozen importlib"):
                return True
            if frame.f_globals.get("__name__") != "__main__":
                return True
        frame = frame.f_back
    return False
