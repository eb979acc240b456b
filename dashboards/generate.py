"""Generate the "Flask contexts" Grafana dashboard from code.

The JSON next to this file is committed so Grafana users can import it without Python, and
it is generated rather than hand-edited so that every panel follows the same rules (the
``datasource`` variable, ``$__rate_interval``, the ``job``/``host``/``app``/``worker``
filters); a test regenerates it and fails on any difference. The alert rules
(``alerts.yml``, from ``config.yaml`` through ``rules.py``) are written by the same run, so
the dashboard's runbook panels and the alerts' links to them cannot drift apart; so are
the Kubernetes manifests in exporters/kubernetes/ (``kubernetes.py``), whose
PrometheusRule holds those same rules.

Run ``python dashboards/generate.py`` to rewrite them all, ``--check`` to only compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as dash_model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models import prometheus as prom_model
from grafana_foundation_sdk.models import text as text_model

from ctxtrace._events import ANOMALIES

OUTPUT = Path(__file__).with_name("flask-contexts.json")
RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "runbook.md"
UID = "ctxtrace-flask-contexts"


def _load(name: str) -> ModuleType:
    """dashboards/NAME.py, by path: dashboards/ is not a package."""
    spec = importlib.util.spec_from_file_location(
        f"ctxtrace_dashboard_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load("rules")
kubernetes = _load("kubernetes")

# Every query names the data source through the variable, so one imported copy of the
# dashboard works against whichever Prometheus the viewer picks.
DATASOURCE = dash_model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters. job and host narrow the workers (a worker is host:pid:role; two matchers
# on one label are both applied). ctxtrace_context_depth_max, the out-of-context and
# agent-health counters and the process metrics carry no `app` label: they are filtered
# by job, host and worker only, since an `app=~"$app"` on them would match nothing.
BY_WORKER = 'job=~"$job", worker=~"$host:.*", worker=~"$worker"'
BY_APP = f'app=~"$app", {BY_WORKER}'



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


def counted(metric: str, selector: str, window: str) -> str:
    """What a counter counted in ``window``, exactly, first occurrences included.

    A worker's counters start at 0 when it starts and never reset (a worker label is one
    process), so the count is the last value minus the value a window ago; a series that
    did not exist then (a new or just-started worker, an import-time access before the
    first scrape) counted all of its value in the window. increase() would miss those and
    extrapolate the rest into fractions.
    """
    series = f"{metric}{{{selector}}}"
    return (
        f"(max_over_time({series}[{window}]) - {series} offset {window})"
        f" or max_over_time({series}[{window}])"
    )


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
        "Deepest stack of app and request contexts seen on any thread (the agent keeps each "
        "spike for a minute, for every reader; the panel takes the maximum over each "
        "interval). A request normally needs two (one app, one request); more means nested "
        "app_context() blocks or contexts that were pushed and never popped.",
        "short",
        [
            query(
                "A",
                "max by (worker) (max_over_time("
                f"ctxtrace_context_depth_max{{{BY_WORKER}}}[$__rate_interval]))",
                "{{worker}}",
            )
        ],
    )


def anomaly_rates() -> timeseries.Panel:
    """One line per (anomaly, worker) pair: the culprit worker stands out."""
    return series_panel(
        "Anomalies by anomaly and worker",
        "Leaked, long-lived, wrongly popped, double-popped, foreign-popped and stale "
        "contexts counted in each interval, first occurrences of a new worker included. "
        "Each anomaly has a section in docs/runbook.md.",
        "short",
        [
            query(
                "A",
                "sum by (anomaly, worker) ("
                f"{counted('ctxtrace_anomalies_total', BY_APP, '$__rate_interval')})",
                "{{anomaly}} {{worker}}",
            )
        ],
    )


def out_of_context() -> timeseries.Panel:
    """Runtime accesses recur with traffic: counted per interval, per worker and proxy."""
    selector = f'phase="runtime", {BY_WORKER}'
    return series_panel(
        "Runtime out-of-context accesses by worker and proxy",
        "Reads of current_app, g, request or session with no context pushed, by a thread "
        "or callback running without a context, counted in each interval. Import-time "
        "accesses (module-level code, once per process) are in the table next to it.",
        "short",
        [
            query(
                "A",
                "sum by (worker, proxy) ("
                f"{counted('ctxtrace_out_of_context_access_total', selector, '$__rate_interval')})",
                "{{worker}} {{proxy}}",
            )
        ],
    ).span(16)


def import_time_accesses() -> table.Panel:
    """Import-time accesses happen before the first scrape: their value is the news."""
    selector = f'phase="import", {BY_WORKER}'
    return (
        table.Panel()
        .title("Import-time out-of-context accesses per worker")
        .description(
            "Processes whose module-level code read a Flask proxy while importing the app, "
            "with the count per proxy (since the process started). Under gunicorn --preload "
            "the master imports the app, so it is listed too."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                "A",
                "max by (worker, proxy) (max_over_time("
                f"ctxtrace_out_of_context_access_total{{{selector}}}[$__range])) > 0",
                "{{worker}} {{proxy}}",
            )
            .instant()
            .format(prom_model.PromQueryFormat.TABLE)
        )
        .with_transformation(
            dash_model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "renameByName": {"Value": "accesses"}},
            )
        )
        .unit("short")
        .decimals(0)
        .height(8)
        .span(8)
    )


def agent_health() -> timeseries.Panel:
    """The agent's own failures: errors it swallowed and records its bounds dropped."""
    return series_panel(
        "Agent internal errors and drops",
        "Errors ctxtrace caught in its own code (the application was not affected) and "
        "records it turned away because a bound was full, per interval. Either one means "
        "the other panels undercount. Every agent exports both at 0 from its start.",
        "short",
        [
            query(
                "A",
                "sum by (component, worker) ("
                f"{counted('ctxtrace_internal_errors_total', BY_WORKER, '$__rate_interval')})",
                "error {{worker}} {{component}}",
            ),
            query(
                "B",
                "sum by (what, worker) ("
                f"{counted('ctxtrace_dropped_total', BY_WORKER, '$__rate_interval')})",
                "dropped {{worker}} {{what}}",
            ),
        ],
    )


def scrapes() -> timeseries.Panel:
    """Whether Prometheus reaches each worker, and how long a scrape takes."""
    return series_panel(
        "Scrapes per worker: up and duration",
        "up is 1 while Prometheus scrapes the worker's /metrics, 0 when a scrape fails "
        "(CtxtraceTargetDown). A worker that is gone (recycled, scaled down) ends its line. "
        "Scrape duration should stay far below the scrape interval.",
        "short",
        [
            query("A", f"max by (worker) (up{{{BY_WORKER}}})", "up {{worker}}"),
            query(
                "B",
                f"max by (worker) (scrape_duration_seconds{{{BY_WORKER}}})",
                "scrape s {{worker}}",
            ),
        ],
    )


def process_memory() -> timeseries.Panel:
    """A leak's memory growth shows beside its anomalies."""
    return series_panel(
        "Worker memory (resident)",
        "Resident memory of each worker process (prometheus_client's process collector, "
        "served beside the agent's metrics). Leaked contexts keep what they hold alive: "
        "a steady climb next to leaks is the leak's cost.",
        "bytes",
        [
            query(
                "A",
                f"max by (worker) (process_resident_memory_bytes{{{BY_WORKER}}})",
                "{{worker}}",
            )
        ],
    )


def process_cpu() -> timeseries.Panel:
    """CPU per worker: the agent's cost and the application's load, together."""
    return series_panel(
        "Worker CPU",
        "CPU seconds per second used by each worker process (the application and the "
        "agent together).",
        "percentunit",
        [
            query(
                "A",
                f"sum by (worker) ({rate('process_cpu_seconds_total', BY_WORKER)})",
                "{{worker}}",
            )
        ],
    )


def total_anomalies() -> stat.Panel:
    """Headline number: anomalies in the selected time range."""
    return (
        stat.Panel()
        .title("Anomalies in range")
        .description(
            "Anomalies and out-of-context accesses recorded by the selected workers in the "
            "time range, first occurrences included; 0 (green) when there were none."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                "A",
                # `or vector(0)`: a fleet that never served a context has no anomaly
                # series at all; show 0 for it, not "No data".
                f"(sum({counted('ctxtrace_anomalies_total', BY_APP, '$__range')}) or vector(0))"
                " + (sum("
                f"{counted('ctxtrace_out_of_context_access_total', BY_WORKER, '$__range')})"
                " or vector(0))",
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
        selector = f'anomaly="{anomaly}", {BY_APP}'
        columns.append(
            (
                chr(ord("A") + index),
                anomaly,
                f"sum by (worker) ({counted('ctxtrace_anomalies_total', selector, '$__range')})",
            )
        )
    for phase in ("import", "runtime"):
        selector = f'phase="{phase}", {BY_WORKER}'
        access = counted("ctxtrace_out_of_context_access_total", selector, "$__range")
        ref_id = chr(ord("A") + len(columns))
        columns.append((ref_id, f"out of context ({phase})", f"sum by (worker) ({access})"))
    return columns


def workers_table() -> table.Panel:
    """Anomalies per worker in the time range, zero-filled so clean workers are listed too."""
    # Every process exports its drop counters from its start: `or` with a zero per process
    # seen in the range keeps a clean, an idle or a recycled worker in the table.
    zero = f"0 * group by (worker) (max_over_time(ctxtrace_dropped_total{{{BY_WORKER}}}[$__range]))"
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
            "Per worker process seen in the time range (recycled ones included): contexts "
            "active now, and how many of each anomaly and out-of-context access it recorded "
            "in the range. Sort by a column to find the worst worker."
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
    """datasource, then job, host and worker cascading, and app.

    Every list comes from ``ctxtrace_dropped_total``, which each agent exports from its
    start: a process that has not served a request yet (a fresh worker, a gunicorn master
    under --preload) is listed too. "All" is the regex ``.*``, not the list of every
    ``host:pid:role`` ever seen, which --max-requests makes thousands long.
    """

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
            .all_value(".*")
            .current(dash_model.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        dash.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_values("job", "label_values(ctxtrace_dropped_total, job)", "Job"),
        # worker is host:pid:role; the host is its first part.
        label_values(
            "host", 'label_values(ctxtrace_dropped_total{job=~"$job"}, worker)', "Host"
        ).regex("/^([^:]+):/"),
        label_values(
            "app", 'label_values(ctxtrace_contexts_total{job=~"$job"}, app)', "App"
        ),
        label_values(
            "worker",
            'label_values(ctxtrace_dropped_total{job=~"$job", worker=~"$host:.*"}, worker)',
            "Worker",
        ),
    ]


class _QueryAnnotation(dash.AnnotationQuery):
    """An annotation whose ``target`` is a data source query, as Grafana's schema has it.

    The SDK's builder only takes the built-in annotation target (tags, limit); its
    ``expr()`` writes the pre-Grafana-8 top-level field that the schema no longer has.
    """

    def __init__(self, target: prometheus.Dataquery) -> None:
        super().__init__()
        self._query = target

    def build(self) -> dash_model.AnnotationQuery:
        built = super().build()
        built.target = self._query.build()  # type: ignore[assignment]
        return built


def annotations() -> dash.AnnotationQuery:
    """Firing ctxtrace alerts drawn on every time series panel."""
    alerts = query("Anno", 'ALERTS{alertname=~"Ctxtrace.*", alertstate="firing", job=~"$job"}')
    return (
        _QueryAnnotation(alerts)
        .name("Firing ctxtrace alerts")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("red")
    )


def runbook_sections(path: Path = RUNBOOK) -> dict[str, str]:
    """Each alert's section of docs/runbook.md (``### Name`` up to the next heading)."""
    sections: dict[str, str] = {}
    for match in re.finditer(
        r"^### (Ctxtrace\w+)\n(.*?)(?=^#{1,3} |^---)", path.read_text(encoding="utf-8"),
        re.MULTILINE | re.DOTALL,
    ):
        sections[match.group(1)] = match.group(2).strip() + "\n"
    missing = set(rules.ALERTS) - set(sections)
    if missing:
        raise SystemExit(f"docs/runbook.md has no section for {sorted(missing)}")
    return sections


def runbook_panel(alert: str, body: str) -> text.Panel:
    """The runbook section an alert's default runbook_url opens (viewPanel=panel-ID)."""
    # Links to other sections of the runbook do not resolve inside Grafana: keep their
    # words, drop the links.
    words = re.sub(r"\[([^\]]+)\]\(#[^)]+\)", r"\1", body)
    return (
        text.Panel()
        .title(f"Runbook: {alert}")
        .mode(text_model.TextMode.MARKDOWN)
        .content(f"## {alert}\n\n{words}")
        .height(10)
        .span(12)
    )


def build() -> dash.Dashboard:
    """The whole dashboard, rows top to bottom in the order an on-call reads them."""
    config = rules.load_config()
    first = next(iter(rules.ALERTS))
    board = (
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
        .annotation(annotations())
        .link(
            dash.DashboardLink("Runbook")
            .type(dash_model.DashboardLinkType.LINK)
            .url(f"{rules.dashboard_url(config)}?viewPanel=panel-{rules.ALERTS[first]}")
            .icon("doc")
            .target_blank(True)
        )
        .link(
            dash.DashboardLink("Firing alerts")
            .type(dash_model.DashboardLinkType.LINK)
            .url(f"{str(config['grafana_url']).rstrip('/')}/alerting/list?search=Ctxtrace")
            .icon("bolt")
            .target_blank(True)
        )
    )
    board = (
        board.with_row(dash.Row("Anomalies").id(1))
        .with_panel(total_anomalies().id(2))
        .with_panel(anomaly_rates().id(3).span(18))
        .with_panel(workers_table().id(4))
        .with_panel(out_of_context().id(5))
        .with_panel(import_time_accesses().id(15))
        .with_row(dash.Row("Lifetimes and stacks").id(6))
        .with_panel(lifetime_quantiles().id(7))
        .with_panel(pushes().id(8))
        .with_panel(lifetime_heatmap("app").id(9))
        .with_panel(lifetime_heatmap("request").id(10))
        .with_panel(active_contexts().id(11))
        .with_panel(stack_depth().id(12))
        .with_row(dash.Row("Agent health").id(13))
        .with_panel(agent_health().id(14))
        .with_panel(scrapes().id(16))
        .with_panel(process_memory().id(17))
        .with_panel(process_cpu().id(18))
        .with_row(dash.Row("Runbook").id(100))
    )
    for alert, body in runbook_sections().items():
        if alert in rules.ALERTS:
            board = board.with_panel(runbook_panel(alert, body).id(rules.ALERTS[alert]))
    return board


#: Fields the SDK writes on every variable that only interval variables have; Grafana's
#: schema has no such fields on the others (the type check rejects them).
_INTERVAL_ONLY = ("auto", "auto_count", "auto_min")


def render() -> str:
    """Stable text: sorted keys and a final newline, so regeneration diffs cleanly."""
    data = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    for variable in data["templating"]["list"]:
        if variable.get("type") != "interval":
            for key in _INTERVAL_ONLY:
                variable.pop(key, None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the JSON, or with --check report whether the committed copy is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only, write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    config = rules.load_config()
    outputs = {args.output: render(), rules.OUTPUT: rules.render(config)}
    for path, (header, documents) in kubernetes.files(config, rules.build(config)).items():
        outputs[path] = header + rules.dump(documents)
    if args.check:
        stale = [
            path for path, wanted in outputs.items()
            if (path.read_text(encoding="utf-8") if path.exists() else "") != wanted
        ]
        for path in stale:
            print(f"{path} is stale: run python dashboards/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for path, wanted in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
