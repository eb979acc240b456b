"""docs/runbook.md has a section for every alert and anomaly, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ctxtrace._events import ANOMALY_KINDS

ANOMALIES = tuple(kind.name for kind in ANOMALY_KINDS)


def anchors(markdown: str) -> set[str]:
    """Anchors GitHub makes from headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(slug.replace(" ", "-"))
    return found


def test_a_section_per_alert_and_anomaly(
    paths: dict[str, Path], alert_rules: list[dict[str, Any]]
) -> None:
    """Every alert's runbook_url anchor and every anomaly name is a heading."""
    present = anchors(paths["runbook"].read_text(encoding="utf-8"))
    for rule in alert_rules:
        assert rule["alert"].lower() in present, rule["alert"]
    for anomaly in ANOMALIES:
        assert anomaly in present, anomaly


def test_internal_links_resolve(paths: dict[str, Path]) -> None:
    """Every #anchor link inside the runbook points at one of its headings."""
    text = paths["runbook"].read_text(encoding="utf-8")
    present = anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert sorted(set(links) - present) == []


def test_points_at_the_culprit_and_the_fixes(paths: dict[str, Path]) -> None:
    """The runbook names the log, span and code fields and the fixes on-call needs."""
    text = paths["runbook"].read_text(encoding="utf-8")
    for needle in (
        "`site`",
        "`flight`",
        "flask.app_context",
        "flask.request_context",
        "code.file.path",
        "code.line.number",
        "ctxtrace demo",
        "with app.app_context():",
        "with_appcontext",
        "ctxtrace.run_in_app_context",
        "ctxtrace.ContextExecutor",
        "init_app",
        "PRESERVE_CONTEXT_ON_EXCEPTION",
        "ctxtrace.<anomaly>",
    ):
        assert needle in text, needle
