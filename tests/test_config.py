"""Configuration parsing: every key, precedence, and clear errors for bad values."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxtrace import Config, ConfigError
from ctxtrace._config import OPTIONS


def test_defaults() -> None:
    """With nothing set, the documented defaults apply."""
    config = Config.resolve({}, {}, {})
    assert config == Config()
    for option in OPTIONS:
        assert getattr(config, option.name) == option.default


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("CTXTRACE_ENABLED", "off", False),
        ("CTXTRACE_LONG_LIVED_REQUEST", "2.5", 2.5),
        ("CTXTRACE_LONG_LIVED_APP", "off", None),
        ("CTXTRACE_LEDGER_CAP", "100", 100),
        ("CTXTRACE_SUPPRESS", "app.legacy, tools/job.py:12", ("app.legacy", "tools/job.py:12")),
        ("CTXTRACE_PROMETHEUS_PORT", "9000-9010", (9000, 9010)),
        ("CTXTRACE_SPANS", "ALL", "all"),
        ("CTXTRACE_PROMETHEUS_SCRAPE", "Host", "host"),
        ("CTXTRACE_PROMETHEUS_RETAIN", "30", 30.0),
    ],
)
def test_environment_strings(key: str, raw: str, expected: Any) -> None:
    """Environment values are strings and parse to typed values."""
    config = Config.resolve({}, {}, {key: raw})
    assert getattr(config, key.removeprefix("CTXTRACE_").lower()) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ledger_cap", True),
        ("ledger_cap", 3),
        ("ledger_cap", "1e3"),
        ("long_lived_request", float("nan")),
        ("long_lived_request", -1),
        ("flight_record", 10**9),
        ("suppress", "has space"),
        ("spans", ""),
        ("prometheus_port", "90-80"),
        ("prometheus_host", "a\nb"),
        ("prometheus_scrape", "pod"),
        ("prometheus_retain", "off"),
        ("prometheus_retain", 0),
        ("no_such_key", 1),
    ],
)
def test_bad_arguments_name_key_value_and_allowed(name: str, value: Any) -> None:
    """Each bad value raises with the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as info:
        Config.resolve({name: value}, {}, {})
    error = info.value
    assert error.key.lower().endswith(name)
    assert error.source == "argument"
    assert repr(value)[:20] in str(error) or "..." in str(error)
    assert "expected" in str(error)


def test_unknown_environment_key_is_reported() -> None:
    """A typo in a CTXTRACE_ variable is an error, not silently ignored."""
    with pytest.raises(ConfigError) as info:
        Config.resolve({}, {}, {"CTXTRACE_LEDGER_CAPP": "10"})
    assert info.value.source == "environment"


@settings(max_examples=300, deadline=None)
@given(
    option=st.sampled_from(OPTIONS),
    value=st.one_of(
        st.text(alphabet=string.printable, max_size=30),
        st.integers(min_value=-(10**12), max_value=10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=3),
        st.text(min_size=5000, max_size=6000),
    ),
    source=st.sampled_from(["argument", "app.config", "environment"]),
)
def test_any_value_parses_or_fails_clearly(option: Any, value: Any, source: str) -> None:
    """Random values from any source: a valid Config or a ConfigError, never anything else."""
    if source == "environment":
        value = str(value)
    arguments = {option.name: value} if source == "argument" else {}
    app_config = {option.key: value} if source == "app.config" else {}
    environ = {option.key: value} if source == "environment" else {}
    try:
        config = Config.resolve(arguments, app_config, environ)
    except ConfigError as error:
        assert error.key == option.key
        assert error.source == source
        assert option.allowed in str(error)
        assert len(str(error)) < 600
    else:
        assert isinstance(config, Config)
