"""``ctxtrace check-imports PACKAGE...``: find Flask proxies used at import time.

Imports every module of the named packages in a fresh Python process where no
context is pushed, with ctxtrace on, and reports each out-of-context access made
while a module was being imported (module, ``file:line``, proxy), each module
that failed to import because of one, and each module that left a context
pushed (popped again so the next module imports with none).

Exit status: 0 when clean, 1 when something was found, 2 on a usage error
(including a package that cannot be found). ``--format json`` for CI. Modules
that fail to import for another reason are listed but do not change the status.

``ctxtrace.cli`` lists this module in ``COMMANDS`` and calls ``register``;
``python -m ctxtrace.commands.check_imports`` runs it on its own.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ctxtrace import _agent
from ctxtrace._events import Anomaly, Event, OutOfContextAccess

COMMAND: Final = "check-imports"
EXIT_CLEAN: Final = 0
EXIT_FOUND: Final = 1
EXIT_USAGE: Final = 2
#: Contexts popped after one module's import, at most (a bound, not an expectation).
_MAX_LEFT: Final = 64
_NAME: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CHILD_FLAG: Final = "--_child-out"


# -- the command ----------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``check-imports`` to the console script's subcommands; ``handler`` runs it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="import every module of packages with no Flask context and report proxy use",
        description=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    _arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("packages", nargs="+", metavar="PACKAGE", help="dotted package names")
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default text)"
    )
    parser.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory to put first on sys.path (repeatable; e.g. src for a src layout)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up on the importing process after this long (default 120)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``check-imports`` on its own (``python -m ctxtrace.commands.check_imports``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [_CHILD_FLAG]:
        return _child(args[1], args[2:])
    parser = argparse.ArgumentParser(prog=f"ctxtrace {COMMAND}")
    _arguments(parser)
    return run(parser.parse_args(args))


def run(args: argparse.Namespace) -> int:
    """Check the packages named in ``args``; return the exit status."""
    bad = [name for name in args.packages if not _NAME.match(name)]
    if bad:
        print(f"ctxtrace {COMMAND}: not a package name: {', '.join(bad)}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        print(f"ctxtrace {COMMAND}: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    report, problem = _run_child(args.packages, [os.path.abspath(p) for p in args.path], args)
    if report is None:
        print(f"ctxtrace {COMMAND}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if report.missing:
        print(
            f"ctxtrace {COMMAND}: no such package: {', '.join(report.missing)}", file=sys.stderr
        )
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(asdict(report), indent=2))
    else:
        print(_text(report))
    return EXIT_FOUND if report.found() else EXIT_CLEAN


# -- the report -----------------------------------------------------------------


@dataclass
class Access:
    """A proxy used with no context while a module was being imported."""

    module: str
    file: str
    line: int
    function: str
    proxy: str
    imported_as: str
    error: str


@dataclass
class FailedImport:
    """A module whose import raised; ``caused_by`` lists the accesses that raised it."""

    module: str
    error: str
    caused_by: list[str] = field(default_factory=list)


@dataclass
class LeftContext:
    """A context pushed while a module was imported and still pushed at the end."""

    module: str
    kind: str
    file: str
    line: int


@dataclass
class Report:
    packages: list[str]
    modules: list[str] = field(default_factory=list)
    accesses: list[Access] = field(default_factory=list)
    failed_imports: list[FailedImport] = field(default_factory=list)
    left_contexts: list[LeftContext] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def found(self) -> bool:
        return bool(
            self.accesses
            or self.left_contexts
            or any(f.caused_by for f in self.failed_imports)
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(
            packages=list(data["packages"]),
            modules=list(data["modules"]),
            accesses=[Access(**a) for a in data["accesses"]],
            failed_imports=[FailedImport(**f) for f in data["failed_imports"]],
            left_contexts=[LeftContext(**c) for c in data["left_contexts"]],
            missing=list(data["missing"]),
        )


def _shown(path: str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


def _text(report: Report) -> str:
    lines = [
        f"{_shown(a.file)}:{a.line}: {a.proxy} used at import time in {a.module}"
        f"{'' if a.function == '<module>' else f' ({a.function})'}: {a.error}"
        for a in report.accesses
    ]
    lines += [
        f"{_shown(c.file)}:{c.line}: {c.module} left an {c.kind} context pushed at import"
        for c in report.left_contexts
    ]
    caused = [f for f in report.failed_imports if f.caused_by]
    other = [f for f in report.failed_imports if not f.caused_by]
    lines += [
        f"{f.module}: failed to import because of the access at {', '.join(f.caused_by)}"
        for f in caused
    ]
    lines += [
        f"{f.module}: could not be imported (not a context problem): {f.error}" for f in other
    ]
    lines.append(
        f"ctxtrace {COMMAND}: modules imported: {len(report.modules)};"
        f" import-time accesses: {len(report.accesses)};"
        f" modules failing because of them: {len(caused)};"
        f" contexts left pushed: {len(report.left_contexts)}"
    )
    return "\n".join(lines)


# -- the importing process --------------------------------------------------------


def _run_child(
    packages: list[str], paths: list[str], args: argparse.Namespace
) -> tuple[Report | None, str]:
    # CTXTRACE_* settings of the caller are not this check's: a bad one would
    # turn ctxtrace off in the child, a suppression would hide findings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXTRACE_")}
    with tempfile.TemporaryDirectory(prefix="ctxtrace-check-") as tmp:
        out = os.path.join(tmp, "report.json")
        command = [
            sys.executable, "-m", "ctxtrace.commands.check_imports", _CHILD_FLAG, out,
            *(f"--path={p}" for p in paths), *packages,
        ]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=args.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, f"importing took longer than {args.timeout:g} s (see --timeout)"
        if not os.path.exists(out):
            tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
            return None, f"the importing process failed (status {done.returncode}):\n{tail}"
        with open(out, encoding="utf-8") as f:
            return Report.from_json(json.load(f)), ""


def _modules_of(name: str) -> Iterator[str]:
    """``name`` and, for a package, every module below it, found without importing them."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(name)
    yield name
    for location in spec.submodule_search_locations or ():
        yield from _walk(location, name + ".")


def _walk(directory: str, prefix: str) -> Iterator[str]:
    for info in sorted(pkgutil.iter_modules([directory]), key=lambda i: i.name):
        if info.name == "__main__":
            continue  # running it is what importing it does
        yield prefix + info.name
        if info.ispkg:
            yield from _walk(os.path.join(directory, info.name), f"{prefix}{info.name}.")


class _Collector:
    name: Final = "check-imports"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)


def _child(out: str, argv: list[str]) -> int:
    """In the fresh process: import everything, write the report to ``out``."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--path=")]
    packages = [a for a in argv if not a.startswith("--path=")]
    for path in reversed(paths):
        sys.path.insert(0, path)

    agent = _agent.start(
        {
            "repair": True, "metrics": "none", "spans": "off", "log_rate_window": "off",
            # Only a module body's own push is long_lived here (reason ``import``).
            "long_lived_request": None, "long_lived_app": None, "sweep_interval": 3600,
        }
    )
    if agent is None:
        print("ctxtrace could not be turned on", file=sys.stderr)
        return EXIT_USAGE
    # Our own report is the output; the log lines would only repeat it.
    for emitter in list(agent.emitters):
        agent.unsubscribe(emitter)
    collector = _Collector()
    agent.subscribe(collector)
    report = Report(packages=packages)
    seen: set[tuple[str, int, str]] = set()
    for package in packages:
        try:
            for parent in _parents(package):
                _import(agent, collector, parent, report, seen)
            names = list(_modules_of(package))
        except ImportError:
            report.missing.append(package)
            continue
        for name in names:
            _import(agent, collector, name, report, seen)
    _agent.stop()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(asdict(report), f)
    # Done: threads or atexit handlers the imported modules left behind must
    # not keep this process (and the command waiting for it) alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CLEAN)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _import(
    agent: Any, collector: _Collector, name: str, report: Report, seen: set[tuple[str, int, str]]
) -> None:
    if name in report.modules:
        return
    report.modules.append(name)
    start = len(collector.events)
    handle = agent.begin_unit("import", name)
    error: BaseException | None = None
    try:
        importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        error = exc
        agent.escaped(exc)
    finally:
        agent.end_unit(handle)
        _pop_left_contexts()
    causes: list[str] = []
    for event in collector.events[start:]:
        if isinstance(event, OutOfContextAccess) and event.site is not None:
            site = event.site
            where = f"{_shown(site.file)}:{site.line}"
            if error is not None and _same_error(event, error):
                causes.append(where)
            key = (site.file, site.line, event.proxy)
            if key not in seen:
                seen.add(key)
                report.accesses.append(
                    Access(
                        module=site.module or name, file=site.file, line=site.line,
                        function=site.function, proxy=event.proxy, imported_as=name,
                        error=f"{event.exc_type}: {event.exc_message}",
                    )
                )
        elif isinstance(event, Anomaly) and (
            event.name == "leaked" or (event.name == "long_lived" and event.reason == "import")
        ):
            ctx_site = event.context.site
            report.left_contexts.append(
                LeftContext(
                    module=name, kind=event.context.kind,
                    file=ctx_site.file if ctx_site is not None else "?",
                    line=ctx_site.line if ctx_site is not None else 0,
                )
            )
    if error is not None:
        first_line = str(error).split("\n", 1)[0][:200]
        report.failed_imports.append(
            FailedImport(
                module=name,
                error=f"{type(error).__name__}: {first_line}",
                caused_by=list(dict.fromkeys(causes)),
            )
        )


def _pop_left_contexts() -> None:
    """Pop what a module's body pushed and left, so the next module imports with none.

    ctxtrace's repair pops what a unit leaked, but never a context a module's
    body pushed at import (its later users rely on it): that one is popped here.
    """
    import flask.globals  # noqa: PLC0415 - in the child, where ctxtrace imported it already

    for name in ("_cv_request", "_cv_app"):
        var = getattr(flask.globals, name, None)
        for _ in range(_MAX_LEFT):
            ctx = var.get(None) if var is not None else None
            if ctx is None:
                break
            try:
                ctx.pop()
            except Exception:
                break


def _same_error(event: OutOfContextAccess, error: BaseException) -> bool:
    """Whether ``error`` is the proxy's own error, reaching the import unhandled."""
    return type(error).__name__ == event.exc_type and str(error).split("\n", 1)[0][
        :200
    ] == event.exc_message


if __name__ == "__main__":
    sys.exit(main())
