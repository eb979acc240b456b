"""One declaration per anomaly kind: everything that lists anomalies reads ANOMALY_KINDS."""

from __future__ import annotations

from dataclasses import fields
from typing import get_args

from ctxtrace import Config
from ctxtrace._config import OPTIONS
from ctxtrace._events import ANOMALIES, ANOMALY_KINDS, AnomalyName
from ctxtrace.commands.report import model as report_model
from ctxtrace.commands.report import plots as report_plots
from ctxtrace.core.records import LedgerPolicy
from ctxtrace.telemetry import logs


def test_the_type_checkers_literal_names_the_stack_anomalies() -> None:
    """``AnomalyName`` (for mypy) and the table agree, in the table's order."""
    assert get_args(AnomalyName) == ANOMALIES
    assert [k.name for k in ANOMALY_KINDS] == [*ANOMALIES, "out_of_context_access"]


def test_each_kind_has_its_detect_option_and_config_field() -> None:
    """``CTXTRACE_DETECT_<NAME>`` exists per kind, with the table's default and sentence."""
    by_name = {o.name: o for o in OPTIONS}
    config_fields = {f.name for f in fields(Config)} - {"sources"}
    assert config_fields == set(by_name)
    for kind in ANOMALY_KINDS:
        option = by_name[f"detect_{kind.name}"]
        assert (option.default, option.doc) == (kind.default_on, kind.detects)
    assert Config().detectors == LedgerPolicy().detect


def test_config_and_ledger_defaults_come_from_the_options() -> None:
    """No default is written twice: Config and LedgerPolicy take them from OPTIONS."""
    config = Config()
    for option in OPTIONS:
        assert getattr(config, option.name) == option.default, option.name
    policy = LedgerPolicy()
    assert (policy.cap, policy.flight) == (config.ledger_cap, config.flight_record)
    assert policy.long_lived_request_s == config.long_lived_request


def test_logs_and_report_follow_the_table() -> None:
    """Log levels, the report's order, fixes and colours are the table's."""
    assert {k.name for k in ANOMALY_KINDS if k.level == "error"} == logs._ERROR_ANOMALIES
    assert tuple(k.name for k in ANOMALY_KINDS) == report_model.ANOMALY_ORDER
    assert {k.name: k.fix for k in ANOMALY_KINDS} == report_model.FIXES
    assert len(set(report_plots.PALETTE.values())) == len(ANOMALY_KINDS)
