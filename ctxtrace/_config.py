"""Configuration: one table of options, read from arguments, app.config and the environment.

Precedence is argument > ``app.config["CTXTRACE_*"]`` > environment
``CTXTRACE_*`` > default. Every option is declared once in ``OPTIONS`` with its
parser, default and a sentence for the README, so the docs, the error messages
and the parsing cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from ctxtrace._events import ANOMALY_KINDS

PREFIX: Final = "CTXTRACE_"


class ConfigError(ValueError):
    """A configuration value is not allowed; names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str, source: str = "argument") -> None:
        # An unknown key is the user's text: bounded and printable, like the value.
        self.key = _bounded(key if isinstance(key, str) else repr(key))
        self.value = value
        self.allowed = allowed
        self.source = source
        super().__init__(
            f"{self.key}={shown(value)} (from {source}) is not allowed: expected {allowed}"
        )


def _bounded(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, anything unprintable escaped."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object) -> str:
    """A value as error messages and log lines show it: its repr, bounded."""
    return _bounded(repr(value))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError


_ASCII_INT: Final = re.compile(r"[+-]?[0-9]{1,12}")
_ASCII_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _int_range(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            # ASCII digits only: int() also takes "1_000", Arabic and full-width digits.
            if not _ASCII_INT.fullmatch(value.strip()):
                raise ValueError
            value = int(value.strip(), 10)
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError
        return value

    return parse


_YEAR_S: Final = 86_400 * 365


def _seconds_or_off(value: object, floor: float = 0.0) -> float | None:
    """A number of seconds above ``floor`` (and at most a year), or ``off``/``None`` to disable."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        # ASCII only: float() also takes "1_000", "infinity" and non-ASCII digits.
        if not _ASCII_NUMBER.fullmatch(value.strip()):
            raise ValueError
        value = float(value.strip())
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError
    if not (value > 0 and floor <= value <= _YEAR_S):
        raise ValueError
    return float(value)


#: The shortest interval of a periodic job: shorter would only burn CPU in an idle process.
MIN_INTERVAL_S: Final = 0.01


def _interval(value: object) -> float:
    seconds = _seconds_or_off(value, MIN_INTERVAL_S)
    if seconds is None:
        raise ValueError
    return seconds


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise ValueError
        return value.strip().lower()

    return parse


_SITE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.]*|[^\s:]+\.py:[0-9]+)$")


def _sites(value: object) -> tuple[str, ...]:
    """Module names (``app.legacy``) or ``path/file.py:LINE``, comma-separated or a list."""
    items: list[object]
    if isinstance(value, str):
        items = [part for part in (p.strip() for p in value.split(",")) if part]
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)
    else:
        raise ValueError
    if len(items) > 1000:
        raise ValueError
    for item in items:
        if not isinstance(item, str) or len(item) > 500 or not _SITE.match(item):
            raise ValueError
    return tuple(str(i) for i in items)


def _port_range(value: object) -> tuple[int, int]:
    """``PORT`` or ``FIRST-LAST``; 0 lets the OS choose."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,5}\s*(-\s*[0-9]{1,5}\s*)?", value):
        parts = [int(p) for p in value.split("-")]
        low, high = parts[0], parts[-1]
    elif isinstance(value, tuple | list) and len(value) == 2:
        low, high = (_int_range(0, 65535)(v) for v in value)
    else:
        raise ValueError
    if not (0 <= low <= high <= 65535) or (low == 0 and high != 0):
        raise ValueError
    return low, high


def _text(max_len: int) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
            raise ValueError
        return value

    return parse


_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host(value: object) -> str:
    """An IP address, or an ASCII host name (RFC 1123 labels, 253 characters at most)."""
    if not isinstance(value, str):
        raise ValueError
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    name = value.removesuffix(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError
    return value


def _folder(value: object) -> str:
    """A directory path (``~`` expands to the home folder), or empty for none.

    Only its form here; ``check_environment`` looks at the file system at start-up.
    """
    text = _text(4096)(value)
    if not text:
        return ""
    if text.startswith("~"):
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            raise ValueError  # no such user, or no home: not a folder literally named ~
        text = expanded
    return text


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration key: how to parse it and what to tell people about it."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    allowed: str
    doc: str

    @property
    def key(self) -> str:
        return PREFIX + self.name.upper()


OPTIONS: Final[tuple[Option, ...]] = (
    Option("enabled", _bool, True, "true or false", "Master switch; false leaves Flask untouched."),
    *(
        Option(f"detect_{kind.name}", _bool, kind.default_on, "true or false", kind.detects)
        for kind in ANOMALY_KINDS
    ),
    Option(
        "long_lived_request", _seconds_or_off, 30.0, "seconds > 0 or off",
        "Age at which a request context is long_lived.",
    ),
    Option(
        "long_lived_app", _seconds_or_off, None, "seconds > 0 or off",
        "Age at which an app context is long_lived (off: CLI and workers hold them legitimately).",
    ),
    Option(
        "long_lived_streaming", _bool, False, "true or false",
        "Also apply long_lived to contexts kept by streaming responses.",
    ),
    Option(
        "ledger_cap", _int_range(16, 10_000_000), 10_000, "integer 16..10000000",
        "Most contexts tracked at once; more are counted in ctxtrace_dropped_total.",
    ),
    Option(
        "flight_record", _int_range(0, 256), 8, "integer 0..256",
        "Pushes and pops per thread kept for anomaly reports (0: off).",
    ),
    Option(
        "repair", _bool, False, "true or false",
        "Pop a leaked context at the end of the unit that leaked it (runs its teardown).",
    ),
    Option(
        "suppress", _sites, (), "module names or file.py:LINE, comma-separated",
        "Push or access sites that are known and accepted; not reported.",
    ),
    Option(
        "sweep_interval", _interval, 1.0, f"seconds >= {MIN_INTERVAL_S}",
        "How often the watchdog looks for long-lived contexts, dead threads and due log summaries.",
    ),
    Option(
        "log_lifecycle", _bool, False, "true or false",
        "Log every push and pop at DEBUG (costly; for debugging only).",
    ),
    Option(
        "log_rate_window", _seconds_or_off, 60.0, "seconds > 0 or off",
        "Per-site rate limit for logs and out-of-context access reports: first occurrence, "
        "then one summary per window (repeated accesses only counted).",
    ),
    Option(
        "spans", _choice("all", "anomalies", "off"), "anomalies", "all, anomalies or off",
        "Which contexts become spans: every one, those ending in an anomaly, or none.",
    ),
    Option(
        "metrics", _choice("prometheus", "otlp", "console", "none"), "prometheus",
        "prometheus, otlp, console or none",
        "Where metrics go when the application has no MeterProvider of its own.",
    ),
    Option(
        "prometheus_scrape", _choice("host", "worker", "both"), "worker", "host, worker or both",
        "host: one /metrics per host serves every process's series (ctxtrace run's default,"
        " unless CTXTRACE_PROMETHEUS_TARGETS_DIR is set); worker: each process serves its own,"
        " found through file_sd; both: the two.",
    ),
    Option(
        "prometheus_host", _host, "127.0.0.1", "an IP address or an ASCII host name",
        "Address the /metrics endpoints bind to.",
    ),
    Option(
        "prometheus_port", _port_range, (9464, 9564), "PORT or FIRST-LAST (0..65535)",
        "A /metrics endpoint (the host's, or each worker's) takes the first free port of this"
        " range.",
    ),
    Option(
        "prometheus_spool_dir", _folder, "",
        "a path to a directory ctxtrace can create or write, or empty for a private one",
        "Folder where each process writes its series for the host's /metrics (scrape host or"
        " both); processes that are not forked from one another share it only through this.",
    ),
    Option(
        "prometheus_retain", _interval, 300.0, f"seconds >= {MIN_INTERVAL_S}",
        "How long the host's /metrics keeps serving the last series of a process that ended.",
    ),
    Option(
        "prometheus_targets_dir", _folder, "",
        "a path to a directory ctxtrace can create or write, or empty for none",
        "Folder where each worker writes its Prometheus file_sd target file (~ is the home"
        " folder; checked, and made if missing, at start-up).",
    ),
)
_BY_NAME: Final = {o.name: o for o in OPTIONS}


def default_of(name: str) -> Any:
    """An option's default, as ``OPTIONS`` declares it (the one place defaults are written)."""
    return _BY_NAME[name].default


@dataclass(frozen=True, slots=True)
class Config:
    """Every option, resolved and validated."""

    enabled: bool = default_of("enabled")
    detect_leaked: bool = default_of("detect_leaked")
    detect_long_lived: bool = default_of("detect_long_lived")
    detect_wrong_pop: bool = default_of("detect_wrong_pop")
    detect_double_pop: bool = default_of("detect_double_pop")
    detect_foreign_pop: bool = default_of("detect_foreign_pop")
    detect_stale_context: bool = default_of("detect_stale_context")
    detect_out_of_context_access: bool = default_of("detect_out_of_context_access")
    long_lived_request: float | None = default_of("long_lived_request")
    long_lived_app: float | None = default_of("long_lived_app")
    long_lived_streaming: bool = default_of("long_lived_streaming")
    ledger_cap: int = default_of("ledger_cap")
    flight_record: int = default_of("flight_record")
    repair: bool = default_of("repair")
    suppress: tuple[str, ...] = default_of("suppress")
    sweep_interval: float = default_of("sweep_interval")
    log_lifecycle: bool = default_of("log_lifecycle")
    log_rate_window: float | None = default_of("log_rate_window")
    spans: str = default_of("spans")
    metrics: str = default_of("metrics")
    prometheus_scrape: str = default_of("prometheus_scrape")
    prometheus_host: str = default_of("prometheus_host")
    prometheus_port: tuple[int, int] = default_of("prometheus_port")
    prometheus_spool_dir: str = default_of("prometheus_spool_dir")
    prometheus_retain: float = default_of("prometheus_retain")
    prometheus_targets_dir: str = default_of("prometheus_targets_dir")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def detectors(self) -> frozenset[str]:
        return frozenset(
            f.name.removeprefix("detect_")
            for f in fields(self)
            if f.name.startswith("detect_") and getattr(self, f.name)
        )

    @classmethod
    def resolve(
        cls,
        arguments: Mapping[str, object] | None = None,
        app_config: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Merge the sources by precedence and validate every value.

        Raises ``ConfigError`` for the first bad value; its ``source`` tells
        whether it came from an argument, app.config or the environment.
        """
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        # Errors in code (arguments, app.config) are raised even when the
        # environment is bad too: the environment's errors only switch ctxtrace
        # off, and must not hide a mistake the application would want to see.
        errors: list[ConfigError] = []
        for name in arguments or {}:
            if name not in _BY_NAME:
                raise ConfigError(name, (arguments or {})[name], _known(), "argument")
        for source, mapping in (("app.config", app_config), ("environment", environ)):
            for key in mapping or {}:
                # app.config is a dict the app fills: keys that are not strings are not ours.
                if (
                    isinstance(key, str)
                    and key.startswith(PREFIX)
                    and key.removeprefix(PREFIX).lower() not in _BY_NAME
                ):
                    errors.append(ConfigError(key, (mapping or {})[key], _known(), source))
        for option in OPTIONS:
            for source, mapping, key in (
                ("argument", arguments, option.name),
                ("app.config", app_config, option.key),
                ("environment", environ, option.key),
            ):
                if mapping is not None and key in mapping:
                    raw = mapping[key]
                    try:
                        values[option.name] = option.parse(raw)
                    except (ValueError, TypeError, OverflowError) as exc:
                        error = ConfigError(option.key, raw, option.allowed, source)
                        error.__cause__ = exc
                        if source == "argument":
                            raise error from exc
                        errors.append(error)
                    sources[option.name] = source
                    break
        if errors:
            raise min(errors, key=lambda e: e.source == "environment")
        return cls(**values, sources=sources)


def _known() -> str:
    return "one of " + ", ".join(o.key for o in OPTIONS)


def _shown(value: object) -> str:
    """A default as the README shows it (``off``, ``9464-9564``, ``(none)``)."""
    text = str(value)
    if value is None:
        text = "off"
    elif isinstance(value, bool):
        text = text.lower()
    elif isinstance(value, tuple):
        pair = len(value) == 2 and all(isinstance(v, int) for v in value)
        text = f"{value[0]}-{value[1]}" if pair else ",".join(map(str, value)) or "(none)"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif value == "":
        text = "(empty)"
    return text


def markdown_table() -> str:
    """The README's configuration table, rendered from ``OPTIONS``."""
    rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    rows += [f"| `{o.key}` | `{_shown(o.default)}` | {o.allowed} | {o.doc} |" for o in OPTIONS]
    return "\n".join(rows)
