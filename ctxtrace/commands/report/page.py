"""The report as one self-contained HTML page (tables, and the plots when there are any)."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Final

from ctxtrace.commands.report.model import RUNBOOK, Explain, Report, anomaly_rank, explain
from ctxtrace.commands.report.plots import INSTALL_HINT, figure_png
from ctxtrace.commands.report.text import kinds_line, lifetimes_line, short_site

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{font-size:90%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
.muted{color:#666}img{max-width:100%}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def where_runbook(report: Report) -> str:
    """The footer's pointer to the runbook: a link when its URL is known."""
    if report.runbook_url:
        url = _e(report.runbook_url)
        return f"<a href='{url}'>{url}</a>"
    return f"the runbook, {_e(RUNBOOK)} in ctxtrace's source (or pass --runbook-url)"


def render_html(report: Report, explainer: Explain | None = None, png: bytes | None = None) -> str:
    """A self-contained HTML page: the panels (when matplotlib is there) and the tables."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(report.title)}</h1><ul class='muted'>",
        *(f"<li>{_e(s)}</li>" for s in report.sources),
        "</ul>",
    ]
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt='ctxtrace report panels' src='data:image/png;base64,{encoded}'>")
    else:
        parts.append(
            "<p class='note'>The plots (lifetimes per worker, anomalies over time, top culprit "
            f"sites) need matplotlib: <code>{_e(INSTALL_HINT)}</code>. The tables below have "
            "the same numbers.</p>"
        )
    for note in report.notes:
        parts.append(f"<p class='note'>{_e(note)}</p>")
    parts.append("<h2>Workers</h2><table><tr><th>worker</th><th>contexts</th>"
                 "<th>lifetime p50 / p99</th><th>anomalies</th><th>from</th></tr>")
    for stats in sorted(report.workers.values(), key=lambda w: w.worker):
        anomalies = ", ".join(
            f"{name} {count}" for name, count in sorted(stats.anomalies.items(),
                                                        key=lambda i: anomaly_rank(i[0]))
        ) or "none"
        parts.append(
            f"<tr><td><code>{_e(stats.worker)}</code></td><td>{_e(kinds_line(stats))}</td>"
            f"<td>{_e(lifetimes_line(stats))}</td><td>{_e(anomalies)}</td>"
            f"<td>{'metrics' if stats.has_metrics else 'log'}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Anomalies and the lines behind them</h2>")
    if not report.culprits:
        parts.append(
            "<p>No log lines given: metric labels never carry code locations. Add "
            "<code>--log FILE</code> with the workers' JSON lines to see the sites.</p>"
        )
    else:
        parts.append(
            "<table><tr><th>anomaly</th><th>count</th><th>site (file:line)</th>"
            "<th>workers</th><th>details</th><th>cause and fix</th></tr>"
        )
        for culprit in report.ordered_culprits():
            info = explain(culprit, explainer)
            where = f"<code>{_e(short_site(culprit.site))}</code>"
            if culprit.function:
                where += f"<br>in <code>{_e(culprit.function)}</code>"
            if culprit.top_site and culprit.top_site != culprit.site:
                where += f"<br>on top: <code>{_e(short_site(culprit.top_site))}</code>"
            workers = "<br>".join(
                f"{_e(w)} &times;{n}" for w, n in sorted(culprit.workers.items())
            )
            details = "<br>".join(
                f"{_e(key)}: {_e(', '.join(sorted(values)))}"
                for key, values in sorted(culprit.details.items())
                if key != "thread"
            )
            cause = f"<b>{_e(info.label)}</b>: {_e(info.cause)}<br>" if info.cause else ""
            name = _e(culprit.anomaly)
            if report.runbook_url:
                name = f"<a href='{_e(f'{report.runbook_url}#{culprit.anomaly}')}'>{name}</a>"
            parts.append(
                f"<tr><td>{name}</td>"
                f"<td>{culprit.count}</td><td>{where}</td><td>{workers}</td><td>{details}</td>"
                f"<td>{cause}<b>fix</b>: {_e(info.fix)}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        f"<p class='muted'>Made by ctxtrace report on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC. What each anomaly means and how "
        f"to fix it: {where_runbook(report)}.</p></body></html>"
    )
    return "\n".join(parts)


def write_outputs(
    report: Report, html_path: Path, explainer: Explain | None = None, png_path: Path | None = None
) -> bytes | None:
    """Write the HTML (and the PNG, when asked and matplotlib is there); returns the PNG."""
    png = figure_png(report)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(report, explainer, png), encoding="utf-8")
    if png_path is not None and png is not None:
        png_path.write_bytes(png)
    return png
