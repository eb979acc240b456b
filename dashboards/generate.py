"""Generate the "Flask contexts" Grafana dashboard from code.

The JSON next to this file is committed so Grafana users can import it without Python, and
it is generated rather than hand-edited so that every panel follows the same rules (the
``datasource`` variable, ``$__rate_interval``, the ``app``/``worker`` filters); a test
regenerates it and fails on any difference.

Run ``python dashboards/generate.py`` to rewrite the JSON, ``--check`` to only compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as dash_model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models import prometheus as prom_model

from ctxtrace._events import ANOMALIES

OUTPUT = Path(__file__).with_name("flask-contexts.json")
UID = "ctxtrace-flask-contexts"

# Every query names the data source through the variable, so one imported copy of the
# dashboard works against whichever Prometheus the viewer picks.
DATASOURCE = dash_model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters.  ctxtrace_context_depth_max and the agent-health counters carry no `app`
# label, so they are filtered by worker only; an `app=~"$app"` on them would match nothing
# as soon as one app is picked.
BY_APP = 'app=~"$app", worker=~"$worker"'
BY_WORKER = 'worker=~"$worker"'



def query(ref_id: str, expr: str, legend: str = "__auto") -> prometheus.Dataquery:
    """A range query bound to the dashboard's data source variable."""
    return (
        prometheus.Dataquery()
        .ref_id(ref_id)
        .expr(expr)
        .legend_format(legend)
        .datasource(DATASOURCE)
    )


def rate(metric: str, selector: str) -> str:
    """rate() over Grafana's $__rate_interval, which never drops below four scrapes."""
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def legend_table() -> common_builder.VizLegendOptions:
    """A legend table with last/max, so a single bad worker can be spotted by sorting."""
    return (
        common_builder.VizLegendOptions()
        .show_legend(True)
        .display_mode(common_model.LegendDisplayMode.TABLE)
        .placement(common_model.LegendPlacement.BOTTOM)
        .calcs(["lastNotNull", "max"])
    )


def series_panel(
    title: str, description: str, unit: str, targets: list[Builder[Dataquery]]
) -> timeseries.Panel:
    """A time series panel with the dashboard's common look."""
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .targets(targets)
        .legend(legend_table())
        .tooltip(
            common_builder.VizTooltipOptions()
            .mode(common_model.TooltipDisplayMode.MULTI)
            .sort(common_model.SortOrder.DESCENDING)
        )
        .fill_opacity(10)
        .height(8)
        .span(12)
    )


def lifetime_quantiles() -> timeseries.Panel:
    """p50/p95/p99 of how long a context stays pushed, per worker and kind."""
    buckets = rate("ctxtrace_context_duration_seconds_bucket", BY_APP)
    targets: list[Builder[Dataquery]] = [
        query(
            ref_id,
            f"histogram_quantile({q}, sum by (le, worker, kind) ({buckets}))",
            f"p{round(q * 100)} {{{{worker}}}} {{{{kind}}}}",
        )
        for ref_id, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))
    ]
    return series_panel(
        "Context lifetime p50 / p95 / p99",
        "Time from push to pop, per worker and kind (app or request). A rising p99 with a "
        "flat p50 points at a few contexts held open: streaming responses, background work "
        "or a missing pop.",
        "s",
        targets,
    )


def lifetime_heatmap(kind: str) -> heatmap.Panel:
    """Histogram buckets drawn as a heatmap; Prometheus already did the bucketing."""
    buckets = rate("ctxtrace_context_duration_seconds_bucket", f'kind="{kind}", {BY_APP}')
    return (
        heatmap.Panel()
        .title(f"Lifetime of {kind} contexts")
        .description(
            f"Distribution of {kind} context lifetimes across the selected workers. A band "
            "far to the top is a set of contexts that stay pushed for seconds or minutes."
        )
        .datasource(DATASOURCE)
        .with_target(
            query("A", f"sum by (le) ({buckets})", "{{le}}").format(
                prom_model.PromQueryFormat.HEATMAP
            )
        )
        # calculate=False: the data is already a histogram, re-bucketing it would lie.
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_model.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .cell_values(heatmap.CellValues().unit("cps"))
        .height(8)
        .span(12)
    )


def pushes() -> timeseries.Panel:
    """Push rate gives the scale against which anomaly rates are judged."""
    return series_panel(
        "Context pushes per second",
        "Contexts pushed per second by worker and kind; the denominator for every anomaly rate.",
        "ops",
        [
            query(
                "A",
                f"sum by (worker, kind) ({rate('ctxtrace_contexts_total', BY_APP)})",
                "{{worker}} {{kind}}",
            )
        ],
    )


def active_contexts() -> timeseries.Panel:
    """A leak shows as a line that climbs and never comes back down."""
    return series_panel(
        "Active contexts per worker",
        "Contexts pushed and not yet popped. It should follow the number of requests in "
        "flight; a line that only climbs is a leak (see the runbook, "
        "CtxtraceContextsAccumulating).",
        "short",
        [
            query(
                "A",
                f"sum by (worker, kind) (ctxtrace_contexts_active{{{BY_APP}}})",
                "{{worker}} {{kind}}",
            )
        ],
    )


def stack_depth() -> timeseries.Panel:
    """Depth above 2 means contexts nested in one thread, often a forgotten pop."""
    return series_panel(
        "Deepest context stack per worker",
        "Deepest stack of app and request contexts seen on any thread since the previous "
        "scrape. A request normally needs two (one app, one request); more means nested "
        "app_context() blocks or contexts that were pushed and never popped.",
        "short",
        [
            query(
                "A",
                f"max by (worker) (ctxtrace_context_depth_max{{{BY_WORKER}}})",
                "{{worker}}",
            )
        ],
    )


def anomaly_rates() -> timeseries.Panel:
    """One line per (anomaly, worker) pair: the culprit worker stands out."""
    return series_panel(
        "Anomalies per second by anomaly and worker",
        "Leaked, long-lived, wrongly popped, double-popped, foreign-popped and stale "
        "contexts. Each anomaly has a section in docs/runbook.md.",
        "ops",
        [
            query(
                "A",
                f"sum by (anomaly, worker) ({rate('ctxtrace_anomalies_total', BY_APP)})",
                "{{anomaly}} {{worker}}",
            )
        ],
    )


def out_of_context() -> timeseries.Panel:
    """Import-time accesses happen once per process; runtime ones recur with traffic."""
    return series_panel(
        "Out-of-context accesses by proxy and phase",
        "Reads of current_app, g, request or session with no context pushed. phase=import "
        "means module-level code (a burst when a worker starts); phase=runtime means a "
        "thread or callback running without a context.",
        "ops",
        [
            query(
                "A",
                "sum by (proxy, phase) ("
                f"{rate('ctxtrace_out_of_context_access_total', BY_WORKER)})",
                "{{proxy}} {{phase}}",
            )
        ],
    )


def agent_health() -> timeseries.Panel:
    """The agent's own failures: errors it swallowed and records its bounds dropped."""
    errors = f"sum by (component, worker) ({rate('ctxtrace_internal_errors_total', BY_WORKER)})"
    # The agent exports an error counter per component only once that component has
    # failed, so a healthy worker has none: fill in a zero line per worker (from the
    # drop counters, which every agent exports from its start) so that "no errors" shows
    # as 0 rather than as "No data", which would look the same as a worker not scraped.
    zero = f"0 * group by (worker) (ctxtrace_dropped_total{{{BY_WORKER}}})"
    return series_panel(
        "Agent internal errors and drops",
        "Errors ctxtrace caught in its own code (the application was not affected) and "
        "records it turned away because a bound was full. Either one means the other "
        "panels undercount. A worker without errors shows one error line at 0.",
        "ops",
        [
            query("A", f"{errors} or on (worker) {zero}", "error {{worker}} {{component}}"),
            query(
                "B",
                f"sum by (what, worker) ({rate('ctxtrace_dropped_total', BY_WORKER)})",
                "dropped {{worker}} {{what}}",
            ),
        ],
    ).span(24)


def total_anomalies() -> stat.Panel:
    """Headline number: anomalies in the selected time range."""
    return (
        stat.Panel()
        .title("Anomalies in range")
        .description(
            "Anomalies recorded by the selected workers in the time range; 0 (green) when "
            "no worker has an anomaly counter yet."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                "A",
                # `or vector(0)`: counters exist only after a first anomaly; show 0, not
                # "No data", for a fleet that never had one.
                f"sum(increase(ctxtrace_anomalies_total{{{BY_APP}}}[$__range])) or vector(0)",
                "anomalies",
            ).instant()
        )
        .unit("short")
        .decimals(0)
        .color_mode(common_model.BigValueColorMode.BACKGROUND)
        .thresholds(
            dash.ThresholdsConfig()
            .mode(dash_model.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dash_model.Threshold(value=None, color="green"),
                    dash_model.Threshold(value=1, color="red"),
                ]
            )
        )
        .height(8)
        .span(6)
    )


def _worker_columns() -> list[tuple[str, str, str]]:
    """(ref id, header, instant query summed by worker) for each workers-table column."""
    columns = [("A", "active contexts", f"sum by (worker) (ctxtrace_contexts_active{{{BY_APP}}})")]
    for index, anomaly in enumerate(ANOMALIES, start=1):
        columns.append(
            (
                chr(ord("A") + index),
                anomaly,
                f'sum by (worker) (ctxtrace_anomalies_total{{anomaly="{anomaly}", {BY_APP}}})',
            )
        )
    columns.append(
        (
            chr(ord("A") + len(columns)),
            "out of context",
            f"sum by (worker) (ctxtrace_out_of_context_access_total{{{BY_WORKER}}})",
        )
    )
    return columns


def workers_table() -> table.Panel:
    """Current anomaly totals per worker, zero-filled so clean workers are listed too."""
    # A counter series only exists once an anomaly happened; `or` with a zero per known
    # worker keeps a healthy worker in the table instead of silently leaving it out.
    zero = f"0 * group by (worker) (ctxtrace_contexts_total{{{BY_APP}}})"
    columns = _worker_columns()
    targets: list[Builder[Dataquery]] = [
        query(ref_id, f"{expr} or {zero}", header)
        .instant()
        .format(prom_model.PromQueryFormat.TABLE)
        for ref_id, header, expr in columns
    ]
    rename = {f"Value #{ref_id}": header for ref_id, header, _ in columns}
    return (
        table.Panel()
        .title("Workers and their anomaly counts")
        .description(
            "Per worker: contexts active now and each anomaly counter's current value "
            "(since the worker started). Sort by a column to find the worst worker."
        )
        .datasource(DATASOURCE)
        .targets(targets)
        .with_transformation(dash_model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dash_model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "renameByName": rename},
            )
        )
        .unit("short")
        .decimals(0)
        .height(9)
        .span(24)
    )


def variables() -> list[Builder[dash_model.VariableModel]]:
    """datasource, then app, then worker narrowed by the chosen app."""

    def label_values(name: str, source: str, label: str) -> dash.QueryVariable:
        return (
            dash.QueryVariable(name)
            .label(label)
            .query(source)
            .datasource(DATASOURCE)
            .refresh(dash_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_model.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .current(dash_model.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        dash.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_values("app", "label_values(ctxtrace_contexts_total, app)", "App").all_value(".*"),
        # No ".*" shortcut for worker: "All" must expand to the workers of the chosen apps,
        # because the metrics without an `app` label are narrowed to an app only this way.
        label_values(
            "worker", 'label_values(ctxtrace_contexts_total{app=~"$app"}, worker)', "Worker"
        ),
    ]


def build() -> dash.Dashboard:
    """The whole dashboard, rows top to bottom in the order an on-call reads them."""
    return (
        dash.Dashboard("Flask contexts")
        .uid(UID)
        .description(
            "Flask application and request contexts as reported by the ctxtrace agent: "
            "lifetimes, stacks, anomalies and the agent's own health."
        )
        .tags(["ctxtrace", "flask", "opentelemetry"])
        .editable()
        .tooltip(dash_model.DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("1m")
        .timezone("browser")
        .variables(variables())
        .link(
            dash.DashboardLink("Runbook")
            .type(dash_model.DashboardLinkType.LINK)
            .url("https://github.com/ctxtrace/ctxtrace/blob/main/docs/runbook.md")
            .icon("doc")
            .target_blank(True)
        )
        .with_row(dash.Row("Anomalies").id(1))
        .with_panel(total_anomalies().id(2))
        .with_panel(anomaly_rates().id(3).span(18))
        .with_panel(workers_table().id(4))
        .with_panel(out_of_context().id(5).span(24))
        .with_row(dash.Row("Lifetimes and stacks").id(6))
        .with_panel(lifetime_quantiles().id(7))
        .with_panel(pushes().id(8))
        .with_panel(lifetime_heatmap("app").id(9))
        .with_panel(lifetime_heatmap("request").id(10))
        .with_panel(active_contexts().id(11))
        .with_panel(stack_depth().id(12))
        .with_row(dash.Row("Agent health").id(13))
        .with_panel(agent_health().id(14))
    )


def render() -> str:
    """Stable text: sorted keys and a final newline, so regeneration diffs cleanly."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the JSON, or with --check report whether the committed copy is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only, write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
