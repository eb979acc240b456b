"""``ctxtrace report``: parsing Prometheus text and JSON logs, the renderers, the command,
and a real Prometheus server scraping the example shop's workers."""

from __future__ import annotations

import html
import json
import math
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ctxtrace.cli import main
from ctxtrace.commands.report import model as report_model
from ctxtrace.commands.report import page as report_page
from ctxtrace.commands.report import plots as report_plots
from ctxtrace.commands.report import sources as report_sources
from ctxtrace.commands.report import text as report_text
from ctxtrace.example.serve import start_server

from .._servers import free_port, server_binary, stop, wait_until

W1 = "w:1:gunicorn"
W2 = "w:2:gunicorn"


def _histogram(worker: str, kind: str, counts: dict[str, int]) -> str:
    lines = [
        f'ctxtrace_context_duration_seconds_bucket{{app="shop",kind="{kind}",le="{le}",'
        f'worker="{worker}"}} {n}.0'
        for le, n in counts.items()
    ]
    total = counts["+Inf"]
    lines.append(
        f'ctxtrace_context_duration_seconds_count{{app="shop",kind="{kind}",worker="{worker}"}} '
        f"{total}.0"
    )
    return "\n".join(lines)


SNAPSHOT = textwrap.dedent(
    """\
    # HELP target_info Target metadata
    # TYPE target_info gauge
    target_info{service_instance_id="w:1:gunicorn"} 1.0
    # HELP ctxtrace_context_duration_seconds Lifetime of Flask contexts, push to last pop.
    # TYPE ctxtrace_context_duration_seconds histogram
    """
) + "\n".join(
    [
        _histogram(W1, "request", {"0.001": 50, "0.01": 99, "0.1": 100, "+Inf": 100}),
        _histogram(W1, "app", {"0.001": 0, "0.01": 10, "+Inf": 10}),
        _histogram(W2, "request", {"0.001": 10, "0.01": 10, "+Inf": 10}),
    ]
) + "\n" + textwrap.dedent(
    """\
    # HELP ctxtrace_contexts_total Flask contexts pushed.
    # TYPE ctxtrace_contexts_total counter
    ctxtrace_contexts_total{app="shop",kind="request",worker="w:1:gunicorn"} 100.0
    ctxtrace_contexts_total{app="shop",kind="app",worker="w:1:gunicorn"} 11.0
    ctxtrace_contexts_total{app="shop",kind="request",worker="w:2:gunicorn"} 10.0
    # HELP ctxtrace_contexts_active Flask contexts pushed and not yet popped.
    # TYPE ctxtrace_contexts_active gauge
    ctxtrace_contexts_active{app="shop",kind="app",worker="w:1:gunicorn"} 1.0
    # HELP ctxtrace_anomalies_total Context anomalies, except out-of-context access.
    # TYPE ctxtrace_anomalies_total counter
    ctxtrace_anomalies_total{anomaly="leaked",app="shop",kind="app",worker="w:1:gunicorn"} 1.0
    ctxtrace_anomalies_total{anomaly="wrong_pop",app="shop",kind="app",worker="w:1:gunicorn"} 0.0
    ctxtrace_anomalies_total{anomaly="wrong_pop",app="shop",kind="app",worker="w:2:gunicorn"} 2.0
    # HELP ctxtrace_out_of_context_access_total Flask proxies used outside any context.
    # TYPE ctxtrace_out_of_context_access_total counter
    ctxtrace_out_of_context_access_total{phase="import",proxy="request",worker="w:1:gunicorn"} 1.0
    ctxtrace_out_of_context_access_total{phase="runtime",proxy="g",worker="w:1:gunicorn"} 3.0
    # HELP other_total Not ours.
    # TYPE other_total counter
    other_total{worker="w:1:gunicorn"} 7.0
    """
)


def _line(event: str, **fields: Any) -> str:
    entry = {"event": f"ctxtrace.{event}", "worker": W1, "pid": 101, "level": "error",
             "timestamp": "2026-11-25T13:00:00.000000Z", **fields}
    return json.dumps(entry)


LOG = [
    "[2026-11-25 13:00:00 +0000] [100] [INFO] Booting worker with pid: 101",
    _line("leaked", anomaly="leaked", site="/srv/shop/jobs.py:12", function="export",
          reason="thread_end", kind="app"),
    _line("leaked", anomaly="leaked", site="/srv/shop/jobs.py:12", function="export",
          reason="thread_end", suppressed_since_last=4, timestamp="2026-11-25T13:01:00Z"),
    _line("wrong_pop", anomaly="wrong_pop", site="/srv/shop/views.py:40", function="swap",
          top_site="/srv/shop/views.py:38", worker=W2, pid=102),
    _line("out_of_context_access", proxy="current_app", phase="import", level="warning",
          site="/srv/shop/settings.py:3", function="<module>", started_by="request:index"),
    "{not json",
    json.dumps(["a", "list"]),
    _line("config_error", key="CTXTRACE_SPANS"),
    _line("push", kind="request", worker="w:3:process", level="debug"),
    _line("pop", kind="request", duration_s=0.002, worker="w:3:process", level="debug"),
    _line("pop", kind="request", duration_s=0.004, worker="w:3:process", level="debug"),
]


class TestPrometheusText:
    def test_contexts_lifetimes_and_anomalies_per_worker(self) -> None:
        """Every ctxtrace metric of a /metrics snapshot lands on its worker; others are ignored."""
        report = report_model.Report()
        used = report_sources.add_samples(report, report_sources.samples_from_text(SNAPSHOT))
        assert used > 0
        assert set(report.workers) == {W1, W2}
        one = report.workers[W1]
        assert one.has_metrics and one.apps == {"shop"}
        assert one.kinds["request"].pushes == 100
        assert one.kinds["app"].pushes == 11
        assert one.kinds["app"].active == 1
        assert one.kinds["request"].finished == 100
        # Two phases and two proxies add up; a zero counter is not an anomaly.
        assert one.anomalies == {"leaked": 1, "out_of_context_access": 4}
        assert report.workers[W2].anomalies == {"wrong_pop": 2}

    def test_quantiles_interpolate_like_histogram_quantile(self) -> None:
        """p50 and p99 come from the cumulative buckets, interpolated within a bucket."""
        report = report_model.Report()
        report_sources.add_samples(report, report_sources.samples_from_text(SNAPSHOT))
        request = report.workers[W1].kinds["request"]
        assert request.quantile(0.5) == pytest.approx(0.001)
        # Rank 99 of 100 is the top of the 1-10 ms bucket (49 of 49 in it).
        assert request.quantile(0.99) == pytest.approx(0.01)
        assert request.quantile(0.995) == pytest.approx(0.01 + 0.09 * 0.5)
        assert report.workers[W1].kinds["app"].quantile(0.5) == pytest.approx(0.0055)

    def test_rank_in_the_inf_bucket_gives_the_highest_bound(self) -> None:
        """As in Prometheus: nothing above the last finite bound can be told apart."""
        assert report_model.bucket_quantile(0.9, {0.1: 1, 1.0: 2, math.inf: 10}) == 1.0
        assert report_model.bucket_quantile(0.5, {0.1: 0, math.inf: 0}) is None
        assert report_model.bucket_quantile(0.5, {}) is None


class TestJsonLog:
    def test_anomalies_sites_and_counts(self) -> None:
        """Each anomaly line counts once plus what the rate limit held back, under its site."""
        report = report_model.Report()
        used = report_sources.add_log_lines(report, LOG, "app.log")
        assert used == 7  # four anomalies, three lifecycle lines; config_error is not one
        assert report.skipped_lines == 3
        leaked = report.culprits[("leaked", "/srv/shop/jobs.py:12")]
        assert leaked.count == 6 and leaked.function == "export"
        assert leaked.details["reason"] == {"thread_end": 6}
        wrong = report.culprits[("wrong_pop", "/srv/shop/views.py:40")]
        assert wrong.top_site == "/srv/shop/views.py:38" and wrong.workers == {W2: 1}
        access = report.culprits[("out_of_context_access", "/srv/shop/settings.py:3")]
        assert access.details["phase"] == {"import": 1}
        assert access.details["started_by"] == {"request:index": 1}
        assert report.workers[W1].anomalies == {"leaked": 6, "out_of_context_access": 1}

    def test_a_summary_line_counts_only_what_it_stands_for(self) -> None:
        """The line a process writes at exit for its last window is not an occurrence itself."""
        report = report_model.Report()
        lines = [
            _line("leaked", anomaly="leaked", site="/srv/shop/jobs.py:12", reason="unit_end"),
            _line("leaked", anomaly="leaked", site="/srv/shop/jobs.py:12", reason="unit_end",
                  suppressed_since_last=29, summary=True),
        ]
        report_sources.add_log_lines(report, lines, "app.log")
        assert report.culprits[("leaked", "/srv/shop/jobs.py:12")].count == 30
        assert report.workers[W1].log_anomalies == {"leaked": 30}

    def test_spliced_lines_are_split(self) -> None:
        """Two workers' lines run together on a shared stream still count as two."""
        first, second = LOG[1], LOG[3]
        report = report_model.Report()
        used = report_sources.add_log_lines(report, [first + second, first + "}garbage"], "x.log")
        assert used == 3 and report.skipped_lines == 1
        assert report.culprits[("wrong_pop", "/srv/shop/views.py:40")].count == 1

    def test_timeline_from_timestamps(self) -> None:
        """Every anomaly line is a point in time with its count."""
        report = report_model.Report()
        report_sources.add_log_lines(report, LOG, "app.log")
        leaked = sorted((at, n) for at, _w, a, n in report.timeline if a == "leaked")
        assert [n for _at, n in leaked] == [1, 5]
        assert leaked[1][0] - leaked[0][0] == pytest.approx(60.0)

    def test_lifecycle_lines_give_exact_lifetimes(self) -> None:
        """With CTXTRACE_LOG_LIFECYCLE=true a log alone gives contexts and lifetimes."""
        report = report_model.Report()
        report_sources.add_log_lines(report, LOG, "app.log")
        kind = report.workers["w:3:process"].kinds["request"]
        assert kind.pushes == 1
        assert kind.quantile(0.5) == pytest.approx(0.002)
        assert kind.quantile(0.99) == pytest.approx(0.004)

    def test_log_and_metrics_merge_per_worker(self) -> None:
        """Metrics give exact counts, logs the sites; each count is the larger of the two."""
        report = report_model.Report()
        report_sources.add_samples(report, report_sources.samples_from_text(SNAPSHOT))
        report_sources.add_log_lines(report, LOG, "app.log")
        assert report.workers[W1].anomalies == {"leaked": 6, "out_of_context_access": 4}
        assert report.workers[W1].kinds["request"].quantile(0.5) == pytest.approx(0.001)


class TestRendering:
    def test_text_names_counts_sites_and_fixes(self) -> None:
        """The terminal report lists each worker's anomalies with file:line and a fix."""
        report = report_model.Report()
        report_sources.add_samples(report, report_sources.samples_from_text(SNAPSHOT))
        report_sources.add_log_lines(report, LOG, "app.log")
        text = report_text.render_text(report)
        assert f"{W1}  (metrics and log)" in text
        assert "request: p50 1.00 ms" in text
        assert "/srv/shop/jobs.py:12 in export  x6" in text
        assert "context on top pushed at /srv/shop/views.py:38" in text
        assert report_model.FIXES["leaked"][:30] in text

    def test_explainer_overrides_the_general_fix(self) -> None:
        """A caller that knows the code (the demo) supplies cause and fix per culprit."""
        report = report_model.Report()
        report_sources.add_log_lines(report, LOG, "app.log")

        def explain(culprit: report_model.Culprit) -> report_model.Explanation | None:
            if culprit.anomaly == "leaked":
                return report_model.Explanation("job", "the export skips its pop", "use with")
            return None

        text = report_text.render_text(report, explain)
        assert "cause: [job] the export skips its pop" in text
        assert "fix:   use with" in text
        page = report_page.render_html(report, explain)
        assert "the export skips its pop" in page

    def test_html_without_matplotlib_has_tables_and_says_how_to_get_plots(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The report extra is optional: without it the HTML still has every number."""
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        report = report_model.Report()
        report_sources.add_log_lines(report, LOG, "app.log")
        assert report_plots.figure_png(report) is None
        page = report_page.render_html(report)
        assert html.escape(report_plots.INSTALL_HINT) in page
        assert "/srv/shop/jobs.py:12" in page and "<img" not in page

    def test_html_links_the_runbook_only_at_a_given_url(self) -> None:
        """No relative runbook links (they break wherever the HTML is opened); with
        --runbook-url, each anomaly links to its anchor there."""
        report = report_model.Report()
        report_sources.add_log_lines(report, LOG, "app.log")
        page = report_page.render_html(report)
        assert "href='docs/runbook.md" not in page
        assert "Push and pop with" in html.unescape(page)  # the fix is in the page itself
        report.runbook_url = "https://runbooks.example/ctxtrace.md"
        page = report_page.render_html(report)
        assert "href='https://runbooks.example/ctxtrace.md#leaked'" in page

    def test_lines_that_name_no_process_add_no_phantom_worker(self) -> None:
        """A ctxtrace line without worker or pid (config errors at start) lists no "?:?:?"."""
        report = report_model.Report()
        lines = [
            json.dumps({"event": "ctxtrace.config_error", "key": "CTXTRACE_SPANS"}),
            json.dumps({"event": "ctxtrace.leaked", "anomaly": "leaked", "site": "a.py:1"}),
            _line("config_error", key="CTXTRACE_SPANS", worker="web:7:gunicorn"),
        ]
        report_sources.add_log_lines(report, lines, "app.log")
        assert report.workers == {}

    def test_html_with_plots(self) -> None:
        """With matplotlib (the test extra has it) the panels are embedded as a PNG."""
        report = report_model.Report()
        report_sources.add_samples(report, report_sources.samples_from_text(SNAPSHOT))
        report_sources.add_log_lines(report, LOG, "app.log")
        png = report_plots.figure_png(report)
        assert png is not None and png.startswith(b"\x89PNG")
        assert "data:image/png;base64," in report_page.render_html(report, png=png)


class TestCommand:
    def test_report_from_log_and_snapshot_files(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``ctxtrace report --log F --metrics F --out H --png P`` writes both; exit 0."""
        log, snapshot = tmp_path / "app.jsonl", tmp_path / "metrics"
        log.write_text("\n".join(LOG) + "\n")
        snapshot.mkdir()
        (snapshot / "web.prom").write_text(SNAPSHOT)
        out, png = tmp_path / "r" / "report.html", tmp_path / "r.png"
        status = main([
            "report", "--log", str(log), "--metrics", str(snapshot), "--out", str(out),
            "--png", str(png),
        ])
        assert status == 0
        printed = capsys.readouterr().out
        assert f"wrote {out}" in printed and "/srv/shop/jobs.py:12" in printed
        assert "wrong_pop" in out.read_text() and png.read_bytes().startswith(b"\x89PNG")

    def test_needs_a_source(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With nothing to read the command says so and exits 2."""
        assert main(["report"]) == 2
        assert "at least one of" in capsys.readouterr().err

    def test_unreachable_prometheus_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A server that does not answer ends the command with status 1 and the reason."""
        url = f"http://127.0.0.1:{free_port()}"
        assert main(["report", "--prometheus", url, "--out", str(tmp_path / "r.html")]) == 1
        assert f"cannot read {url}" in capsys.readouterr().err


def _query(base: str, query: str) -> list[Any]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        result: list[Any] = json.loads(response.read())["data"]["result"]
        return result


def test_report_from_a_prometheus_server(tmp_path: Path) -> None:
    """A real Prometheus scrapes the shop's workers through file_sd; the report reads its API
    (latest values and the anomaly timeline) and a worker's /metrics endpoint directly."""
    binary = server_binary("prometheus", "prometheus")
    with start_server(tmp_path / "shop", workers=2) as server:
        config = tmp_path / "prometheus.yml"
        config.write_text(textwrap.dedent(f"""\
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            scrape_configs:
              - job_name: ctxtrace
                honor_labels: true
                file_sd_configs: [{{files: ["{server.targets_dir}/*.json"], refresh_interval: 1s}}]
            """))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            for _ in range(3):
                urllib.request.urlopen(server.url + "/fault/wrong-order", timeout=5).close()
                urllib.request.urlopen(server.url + "/items", timeout=5).close()

            def scraped() -> bool:
                """Every wrong pop counted, and both workers scraped (one may have served
                all three wrong pops before Prometheus found the other)."""
                try:
                    found = _query(base, "sum(ctxtrace_anomalies_total{anomaly='wrong_pop'})")
                    seen = report_model.Report()
                    report_sources.add_prometheus(seen, base, 300)
                except OSError:
                    return False
                gunicorn = [w for w in seen.workers if w.endswith(":gunicorn")]
                return bool(found) and float(found[0]["value"][1]) == 3 and len(gunicorn) == 2

            wait_until(scraped, timeout=60, interval=0.5, what="Prometheus to scrape the workers")
            out = tmp_path / "report.html"
            assert main(["report", "--prometheus", base, "--since", "5m", "--out", str(out)]) == 0
            page = out.read_text()
            assert "wrong_pop" in page and f"Prometheus {base}" in page
            report = report_model.Report()
            report_sources.add_prometheus(report, base, 300)
            workers = {w for w in report.workers if w.endswith(":gunicorn")}
            assert len(workers) == 2
            assert sum(report.workers[w].anomalies["wrong_pop"] for w in workers) == 3
            assert sum(n for _at, _w, a, n in report.timeline if a == "wrong_pop") == 3
            # A worker that happened to serve none of the requests has no request series.
            kinds = [report.workers[w].kinds for w in workers]
            requests = sum(k["request"].pushes for k in kinds if "request" in k)
            assert requests >= 6
            # One worker's endpoint, read directly, is one scrape with no time axis.
            target = next(iter(t for w, t in server.targets().items() if w in workers))
            direct = report_model.Report()
            report_sources.add_prometheus(direct, f"http://{target}/metrics")
            assert list(direct.workers) and not direct.timeline
        finally:
            stop(prometheus, grace=10)
