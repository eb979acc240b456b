"""The README cannot drift from the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

from ctxtrace import ANOMALIES
from ctxtrace._config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_configuration_table_matches_options() -> None:
    """The table between the config-table markers is exactly what OPTIONS renders."""
    text = README.read_text()
    block = re.search(
        r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", text, re.S
    )
    assert block is not None
    assert block.group(1) == markdown_table(), (
        "README config table is stale; regenerate with: python -c "
        "'from ctxtrace._config import markdown_table; print(markdown_table())'"
    )


def test_every_anomaly_is_documented() -> None:
    """Each anomaly name of the contract has a row in the README."""
    text = README.read_text()
    for name in (*ANOMALIES, "out_of_context_access"):
        assert f"`ctxtrace.{name}`" in text, name
