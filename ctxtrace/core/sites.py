"""Finding the line of user code responsible for a push or an access.

The walk runs on every push by user code, so it is built to be cheap: each code
object is classified once (library, user, a streaming generator) and the answer
cached; the walk itself is a few dictionary lookups. The caches are keyed by
``id(code)`` and hold the code object itself, which keeps the id from being
reused: hashing a code object hashes its constants and names on every lookup.
User sites are cached per code object and instruction offset (``f_lasti``),
because turning an offset into a line number scans the line table; a hot push
site allocates nothing after its first use.
"""

from __future__ import annotations

import contextlib
import os
import site
import sys
import sysconfig
import threading
from dataclasses import replace
from types import CodeType, FrameType
from typing import Final

import click
import flask
import werkzeug

from ctxtrace._events import Site

USER: Final = 0
LIBRARY: Final = 1
STREAM: Final = 2
#: Installed packages and the standard library: not the culprit while an
#: application frame calls them, but named beside it (``Site.via``).
THIRD_PARTY: Final = 3


def _package_dir(module_file: str | None) -> str:
    return os.path.dirname(os.path.abspath(module_file or "")) + os.sep


# The packages whose frames are never the culprit: Flask and the libraries it
# calls through, and ctxtrace itself. click is here because `flask` CLI pushes
# go through it before reaching the user's command.
_OWN_DIR: Final = _package_dir(sys.modules[__name__.partition(".")[0]].__file__)
_LIBRARY_DIRS: Final = (*(_package_dir(m.__file__) for m in (flask, werkzeug, click)), _OWN_DIR)
_LIBRARY_FILES: Final = (os.path.abspath(contextlib.__file__),)
# The example shop ships inside the package but is application code: its frames
# are the culprits that `ctxtrace demo` points at.
_USER_DIRS: Final = (os.path.join(_OWN_DIR, "example") + os.sep,)


def _third_party_dirs() -> tuple[str, ...]:
    """Where installed packages and the standard library live (this interpreter's paths)."""
    paths = sysconfig.get_paths()
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    found = {paths[name] for name in names if name in paths}
    found.update(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        found.add(site.getusersitepackages())
    return tuple(sorted(os.path.abspath(p) + os.sep for p in found if p))


_THIRD_PARTY_DIRS: Final = _third_party_dirs()

# id(code) -> (code, class, {f_lasti: (USER, site)} for user code).
_Known = tuple[CodeType, int, dict[int, tuple[int, Site]] | None]
_codes: dict[int, _Known] = {}
# Two indexes of ``_codes`` for the common walk (``caller``): the ids of library
# code, and each user code's sites by instruction offset. Only codes ``_codes``
# holds are in them, so their ids are not reused.
_library: set[int] = set()
_user_sites: dict[int, dict[int, tuple[int, Site]]] = {}
_MAX_CACHED: Final = 4096
_MAX_LINES: Final = 256
_lock = threading.Lock()
_LIBRARY_RESULT: Final = (LIBRARY, None)
_SYS: Final = vars(sys)
#: ``importlib._bootstrap._module_locks`` (CPython 3.3+): name -> lock of each module
#: being imported. If a Python lacks it, the stand-in is never empty: always walk.
_MODULE_LOCKS: Final[dict[str, object]] = getattr(
    sys.modules["importlib._bootstrap"], "_module_locks", {"": None}
)
_STREAM_RESULT: Final = (STREAM, None)


def mark(code: CodeType, klass: int) -> None:
    """Pin the class of a code object (Flask's stream helper)."""
    with _lock:
        _codes[id(code)] = (code, klass, {} if klass == USER else None)
        _library.discard(id(code))
        _user_sites.pop(id(code), None)


def _classify(code: CodeType) -> _Known:
    path = code.co_filename
    if path.startswith("<frozen importlib"):
        klass = LIBRARY
    else:
        absolute = os.path.abspath(path) if not path.startswith("<") else path
        library = (
            absolute.startswith(_LIBRARY_DIRS) and not absolute.startswith(_USER_DIRS)
        ) or absolute in _LIBRARY_FILES
        if library:
            klass = LIBRARY
        elif absolute.startswith(_THIRD_PARTY_DIRS) and not absolute.startswith(_USER_DIRS):
            klass = THIRD_PARTY
        else:
            klass = USER
    known: _Known = (code, klass, {} if klass in (USER, THIRD_PARTY) else None)
    if len(_codes) < _MAX_CACHED:
        with _lock:
            if id(code) not in _codes:
                _codes[id(code)] = known
                if klass == LIBRARY:
                    _library.add(id(code))
                elif klass == USER and known[2] is not None:
                    _user_sites[id(code)] = known[2]
            known = _codes[id(code)]
    return known


def _user_site(frame: FrameType, known: _Known) -> tuple[int, Site]:
    """``(USER, site)`` for a frame of user code, built once per instruction offset."""
    lines = known[2]
    lasti = frame.f_lasti
    if lines is not None:
        found = lines.get(lasti)
        if found is not None:
            return found
    code = frame.f_code
    found = (
        USER,
        Site(
            file=code.co_filename,
            line=frame.f_lineno,
            function=getattr(code, "co_qualname", code.co_name),
            module=str(frame.f_globals.get("__name__", "")),
        ),
    )
    if lines is not None and len(lines) < _MAX_LINES:
        lines[lasti] = found
    return found


def caller(depth: int, frame: FrameType | None = None) -> tuple[int, Site | None]:
    """Classify the first interesting frame from ``depth`` up and return its site.

    ``depth`` counts from this function's own frame (0), as ``sys._getframe`` does;
    a caller that holds that frame already passes it as ``frame``.

    Returns ``(USER, site)`` for application code, ``(STREAM, None)`` when a
    streaming response is pushing, and ``(LIBRARY, None)`` when every frame is
    Flask's or ctxtrace's. Installed packages and the standard library are passed
    over for the first application frame above them; the nearest of them is kept
    as the site's ``via``. With no application frame at all (an application
    installed as a package), that nearest one is the site. The tuples are
    cached: the common case allocates nothing.
    """
    if frame is None:
        frame = sys._getframe(depth)
    # The common case first: library frames (Flask's own ``__enter__``), then a
    # line of user code seen before. Anything else takes the whole walk below.
    library = _library
    walked: FrameType | None = frame
    while walked is not None and id(walked.f_code) in library:
        walked = walked.f_back
    if walked is None:
        return _LIBRARY_RESULT
    lines = _user_sites.get(id(walked.f_code))
    if lines is not None:
        found = lines.get(walked.f_lasti)
        if found is not None:
            return found
    codes = _codes
    via: tuple[int, Site] | None = None
    while frame is not None:
        code = frame.f_code
        known = codes.get(id(code)) or _classify(code)
        klass = known[1]
        if klass == USER:
            # The cache hit is inlined: this runs on every push by user code.
            lines = known[2]
            found = lines.get(frame.f_lasti) if lines is not None else None
            if found is None:
                found = _user_site(frame, known)
            return found if via is None else (USER, replace(found[1], via=via[1]))
        if klass == THIRD_PARTY:
            if via is None:
                via = _user_site(frame, known)
        elif klass != LIBRARY:
            return _STREAM_RESULT
        frame = frame.f_back
    return via if via is not None else _LIBRARY_RESULT


def is_import_time(depth: int) -> bool:
    """Whether module-level code of a module being imported is on the stack.

    The import system holds a module lock for each module it imports, whatever
    the loader: with none held anywhere, nothing is being imported, and the walk
    down the whole stack is skipped (the common case once the app runs).
    """
    if not _MODULE_LOCKS:
        return False
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            back = frame.f_back
            # A module body run by the import system, not the script's own __main__.
            if back is not None and back.f_code.co_filename.startswith("<frozen importlib"):
                return True
            # One run by another loader (pytest's assertion rewriting): the import
            # system marks the module's spec while its body runs. Code exec'd in a
            # module-like namespace that is not being imported (execnet's, an
            # embedding host's) is run time.
            spec = frame.f_globals.get("__spec__")
            if spec is not None and getattr(spec, "_initializing", False):
                return True
        frame = frame.f_back
    return False


def caught_by_application(exc: BaseException) -> bool:
    """Whether application code caught ``exc``, judged from its traceback alone.

    For errors raised outside any unit of work, where no boundary is watched:
    the outermost frame an error has unwound to is the one that caught it (or
    the one it is passing through). An error that ended the program is
    ``sys.last_value``; one caught by a library's frame (a server's import of
    the app, a thread's bootstrap) reached a framework, not the application.
    """
    # The module's dict, not getattr: a missing attribute costs an AttributeError.
    if exc is _SYS.get("last_value"):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    known = _codes.get(id(code)) or _classify(code)
    return known[1] == USER
