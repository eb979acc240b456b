"""Checks on exporters/: Prometheus, Alertmanager, Collector and compose configuration.

Prometheus and Alertmanager configs go through their own tools. No OpenTelemetry
Collector or Docker can be installed here, so those two files are parsed and
cross-checked for structure only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a tool, keeping its output for the assertion message."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def load(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- Prometheus


def test_promtool_check_config(promtool: str, paths: dict[str, Path]) -> None:
    """prometheus.yml is valid, and its rule_files entry finds dashboards/alerts.yml."""
    result = run(promtool, "check", "config", str(paths["exporters"] / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout


def test_prometheus_scrapes_worker_targets_from_file_sd(paths: dict[str, Path]) -> None:
    """The ctxtrace job discovers one target file per worker, and alerts reach Alertmanager."""
    config = load(paths["exporters"] / "prometheus.yml")
    config_dir = paths["exporters"]
    rule_files = [(config_dir / name).resolve() for name in config["rule_files"]]
    assert rule_files == [paths["alerts"].resolve()]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ctxtrace"]
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert files == ["/var/run/ctxtrace/targets/*.json"]
    assert job.get("honor_labels") is True  # keep the agent's own worker/app labels
    alertmanagers = config["alerting"]["alertmanagers"]
    assert alertmanagers[0]["static_configs"][0]["targets"]


# ---------------------------------------------------------------- Alertmanager


def test_amtool_check_config(amtool: str, paths: dict[str, Path]) -> None:
    """alertmanager.yml is a valid Alertmanager configuration."""
    result = run(amtool, "check-config", str(paths["exporters"] / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_by_severity(amtool: str, paths: dict[str, Path]) -> None:
    """critical goes to the pager, warning (and anything unlabelled) to tickets."""
    config = str(paths["exporters"] / "alertmanager.yml")
    expected = {
        "severity=critical": "pager",
        "severity=warning": "tickets",
        "alertname=SomethingElse": "tickets",
    }
    for labels, receiver in expected.items():
        result = run(amtool, "config", "routes", "test", f"--config.file={config}", labels)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.split() == [receiver], (labels, result.stdout)


def test_alertmanager_groups_by_what_a_person_acts_on(paths: dict[str, Path]) -> None:
    """One notification per alert, app and job, never one per worker process."""
    config = load(paths["exporters"] / "alertmanager.yml")
    group_by = config["route"]["group_by"]
    assert set(group_by) == {"alertname", "app", "job"}
    for route in config["route"].get("routes", []):
        assert "worker" not in route.get("group_by", []), route


def test_alertmanager_template_lists_the_workers(amtool: str, paths: dict[str, Path]) -> None:
    """The notification text template renders and names the workers of a group."""
    template = paths["exporters"] / "ctxtrace.tmpl"
    result = run(
        amtool, "template", "render", f"--template.glob={template}",
        '--template.text={{ template "ctxtrace.text" . }}',
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Workers (" in result.stdout


def test_alertmanager_receivers_are_webhooks(paths: dict[str, Path]) -> None:
    """The example receivers are webhooks, so the routing can be tried without accounts."""
    config = load(paths["exporters"] / "alertmanager.yml")
    for receiver in config["receivers"]:
        assert receiver["webhook_configs"][0]["url"].startswith("http"), receiver["name"]


# ---------------------------------------------------------------- OpenTelemetry Collector


def test_collector_pipelines_are_wired(paths: dict[str, Path]) -> None:
    """OTLP in over gRPC and HTTP; traces to Tempo, logs to Loki, metrics to Prometheus.

    Every component a pipeline names is defined, and every defined one is used (the
    collector refuses the first and silently ignores the second).
    """
    config = load(paths["exporters"] / "otel-collector.yaml")
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "logs", "metrics"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] == ["otlp"], name
        assert pipeline["processors"][0] == "memory_limiter", name
        for kind, components in used.items():
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name} uses undefined {component}"
                components.add(component)
    for kind, components in used.items():
        assert set(config[kind]) == components, f"unused {kind}"
    assert set(config["service"].get("extensions", [])) == set(config.get("extensions", {}))

    # Component type is the part of the id before "/".
    def types(pipeline: str) -> set[str]:
        return {e.split("/")[0] for e in pipelines[pipeline]["exporters"]}

    assert types("metrics") == {"prometheus"}
    assert types("traces") <= {"otlp", "otlphttp"}
    assert types("logs") <= {"otlphttp", "loki"}
    (traces,) = pipelines["traces"]["exporters"]
    assert "tempo" in config["exporters"][traces]["endpoint"]
    (logs,) = pipelines["logs"]["exporters"]
    assert config["exporters"][logs]["endpoint"].endswith("/otlp")  # Loki's OTLP endpoint


def test_the_app_pushes_to_the_collectors_http_receiver(paths: dict[str, Path]) -> None:
    """The compose app's OTLP settings name the protocol and the port of the collector's
    OTLP/HTTP receiver (what tests/end_to_end/test_otlp_route.py pushes to)."""
    collector = load(paths["exporters"] / "otel-collector.yaml")
    receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    app = load(paths["exporters"] / "compose.yaml")["services"]["app"]["environment"]
    assert app["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert app["OTEL_EXPORTER_OTLP_ENDPOINT"].rsplit(":", 1)[1] == receiver.rsplit(":", 1)[1]


# ---------------------------------------------------------------- compose


def test_compose_mounts_and_ports_line_up(paths: dict[str, Path]) -> None:
    """Every mounted file exists, and the ports match what the configs point at."""
    exporters = paths["exporters"]
    compose = load(exporters / "compose.yaml")
    services = compose["services"]
    assert {
        "app",
        "prometheus",
        "alertmanager",
        "otel-collector",
        "tempo",
        "loki",
        "grafana",
    } <= set(services)
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (exporters / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"

    # Scrapers of 127.0.0.1 targets must share the app's network namespace.
    for name in ("prometheus", "alertmanager", "otel-collector"):
        assert services[name]["network_mode"] == "service:app", name
    published = {port.split(":")[0] for port in services["app"]["ports"]}
    assert {"9090", "9093", "4317", "4318"} <= published
    prometheus = load(exporters / "prometheus.yml")
    alertmanager_target = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]
    assert alertmanager_target["targets"] == ["127.0.0.1:9093"]

    # The target folder the app writes to is the one Prometheus reads.
    (pattern,) = prometheus["scrape_configs"][0]["file_sd_configs"][0]["files"]
    folder = str(Path(pattern).parent)
    assert services["app"]["environment"]["CTXTRACE_PROMETHEUS_TARGETS_DIR"] == folder
    assert any(v.split(":")[1] == folder for v in services["prometheus"]["volumes"])

    # Prometheus resolves ../dashboards/alerts.yml against /etc/prometheus.
    assert (
        "../dashboards/alerts.yml:/etc/dashboards/alerts.yml:ro"
        in services["prometheus"]["volumes"]
    )


def test_grafana_provisioning(paths: dict[str, Path]) -> None:
    """Grafana gets Prometheus (scrape interval as timeInterval) and the dashboard folder."""
    grafana = paths["exporters"] / "grafana"
    sources = {s["type"]: s for s in load(grafana / "datasources.yaml")["datasources"]}
    assert {"prometheus", "tempo", "loki"} <= set(sources)
    prometheus = load(paths["exporters"] / "prometheus.yml")
    assert (
        sources["prometheus"]["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    )
    assert sources["prometheus"]["isDefault"] is True
    (provider,) = load(grafana / "dashboards.yaml")["providers"]
    compose = load(paths["exporters"] / "compose.yaml")
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]]
    assert any(
        re.fullmatch(re.escape(provider["options"]["path"]) + r"/[\w.-]+\.json", m) for m in mounts
    )
