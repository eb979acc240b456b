"""Checks on exporters/kubernetes/: the PrometheusRule, the PodMonitor and the example Deployment.

No cluster or Prometheus Operator runs here: the manifests are checked for the fields the
Operator and Kubernetes require, against each other (the PodMonitor scrapes the ports the
Deployment declares, with the job the rules select), against dashboards/alerts.yml, and
the embedded rules with promtool.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from ctxtrace._config import PREFIX, Config

FILES = ("prometheusrule.yaml", "podmonitor.yaml", "deployment.yaml")
BIN = Path(sys.executable).parent
#: A Kubernetes port name (IANA_SVC_NAME): 15 characters at most, lower-case letters,
#: digits and inner dashes, at least one letter.
PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")


def load(path: Path) -> dict[str, Any]:
    """The one document of a manifest file."""
    (document,) = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def manifests(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Each committed manifest, by kind."""
    documents = [load(paths["exporters"] / "kubernetes" / name) for name in FILES]
    return {document["kind"]: document for document in documents}


@pytest.fixture(scope="module")
def config(paths: dict[str, Path]) -> dict[str, Any]:
    """dashboards/config.yaml, the source of the rules and the manifests."""
    data: dict[str, Any] = yaml.safe_load(
        (paths["dashboards"] / "config.yaml").read_text(encoding="utf-8")
    )
    return data


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The example Deployment's one container."""
    (found,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def selected_job(config: dict[str, Any]) -> str:
    """The job the rules' selector names."""
    found = re.fullmatch(r'job="([^"]+)"', config["selector"])
    assert found, config["selector"]
    return found.group(1)


def test_required_fields(manifests: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    """apiVersion, kind, a name and labels on each; the Operator's CRDs carry the labels
    that a Prometheus resource's ruleSelector and podMonitorSelector match."""
    assert set(manifests) == {"PrometheusRule", "PodMonitor", "Deployment"}
    for kind, manifest in manifests.items():
        assert manifest["metadata"]["name"], kind
        assert manifest["metadata"]["labels"], kind
        assert manifest["spec"], kind
    for kind in ("PrometheusRule", "PodMonitor"):
        assert manifests[kind]["apiVersion"] == "monitoring.coreos.com/v1"
        assert manifests[kind]["metadata"]["labels"] == config["kubernetes"]["labels"]
    assert manifests["Deployment"]["apiVersion"] == "apps/v1"


def test_prometheus_rule_is_alerts_yml(
    manifests: dict[str, dict[str, Any]], paths: dict[str, Path]
) -> None:
    """spec.groups are dashboards/alerts.yml's groups: every expression, label and
    annotation identical."""
    alerts = yaml.safe_load(paths["alerts"].read_text(encoding="utf-8"))
    groups = manifests["PrometheusRule"]["spec"]["groups"]
    assert groups == alerts["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    assert exprs == [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    assert len(exprs) == 9


def test_promtool_checks_the_embedded_rules(
    promtool: str, manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The PrometheusRule's spec is a valid Prometheus rules file."""
    rules = tmp_path / "spec.yml"
    rules.write_text(yaml.safe_dump(manifests["PrometheusRule"]["spec"]), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout, result.stdout


def test_pod_monitor_scrapes_the_declared_metrics_port(
    manifests: dict[str, dict[str, Any]]
) -> None:
    """The PodMonitor selects the Deployment's pods and has one endpoint, at /metrics, for
    their one ctxtrace port."""
    spec = manifests["PodMonitor"]["spec"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    declared = {p["name"] for p in container(manifests)["ports"] if p["name"] != "http"}
    endpoints = spec["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == sorted(declared)
    assert len(endpoints) == 1
    assert {e["path"] for e in endpoints} == {"/metrics"}


def test_targets_get_the_job_the_rules_select(
    manifests: dict[str, dict[str, Any]], config: dict[str, Any]
) -> None:
    """Each endpoint sets job to the selector's job (the Operator's own would be
    namespace/name), and drops the per-pod labels, so instance alone tells targets
    apart, as the rules' joins and CtxtraceTargetDown expect."""
    for endpoint in manifests["PodMonitor"]["spec"]["podMetricsEndpoints"]:
        job, drop = endpoint["relabelings"]
        assert job == {"targetLabel": "job", "replacement": selected_job(config)}
        assert drop["action"] == "labeldrop"
        assert re.fullmatch(drop["regex"], "pod")
        assert re.fullmatch(drop["regex"], "endpoint")
        for kept in ("instance", "job", "namespace", *config["target_labels"]):
            assert not re.fullmatch(drop["regex"], kept), kept
    assert set(config["target_labels"]) == {"job", "instance"}


def test_deployment_runs_gunicorn_under_ctxtrace_run(
    manifests: dict[str, dict[str, Any]], config: dict[str, Any]
) -> None:
    """`ctxtrace run -- gunicorn`, one address for the pod (scrape host), and
    CTXTRACE_PROMETHEUS_PORT exactly the one declared metrics port."""
    entry = container(manifests)
    command = entry["command"]
    assert command[:4] == ["ctxtrace", "run", "--", "gunicorn"]
    workers = int(command[command.index("--workers") + 1])
    assert workers == config["kubernetes"]["workers"]
    env = {item["name"]: item["value"] for item in entry["env"]}
    resolved = Config.resolve(environ=env)
    assert set(resolved.sources) == {k.removeprefix(PREFIX).lower() for k in env}
    assert resolved.metrics == "prometheus"
    assert resolved.prometheus_host == "0.0.0.0"
    assert resolved.prometheus_scrape == "host"
    low, high = resolved.prometheus_port
    metrics_ports = {p["containerPort"] for p in entry["ports"] if p["name"] != "http"}
    assert metrics_ports == {low} == {high}
    names = [p["name"] for p in entry["ports"]]
    assert len(names) == len(set(names))
    assert all(PORT_NAME.fullmatch(name) for name in names), names


def test_check_fails_on_stale_manifests(
    generator: ModuleType,
    paths: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`generate.py --check` compares each manifest: an edited or a missing one fails."""
    for name in FILES:
        shutil.copy(paths["exporters"] / "kubernetes" / name, tmp_path / name)
    monkeypatch.setattr(generator.kubernetes, "FOLDER", tmp_path)
    assert generator.main(["--check"]) == 0
    for name in FILES:
        edited = tmp_path / name
        original = edited.read_text(encoding="utf-8")
        edited.write_text(original.replace("ctxtrace", "ctxtrace-edited", 1), encoding="utf-8")
        assert generator.main(["--check"]) == 1, name
        assert f"{edited} is stale" in capsys.readouterr().err
        edited.unlink()
        assert generator.main(["--check"]) == 1, name
        assert f"{edited} is stale" in capsys.readouterr().err
        edited.write_text(original, encoding="utf-8")
    assert generator.main(["--check"]) == 0


def workers_on(port: int) -> set[str]:
    """The ``worker`` labels of the /metrics a port serves (none if nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return set()
    return set(re.findall(r'worker="([^"]+)"', text))


def test_the_deployments_command_serves_every_process_on_its_port(
    manifests: dict[str, dict[str, Any]],
    paths: dict[str, Path],
    livestack: ModuleType,
    missing: Callable[[str], None],
    config: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Run as the container says (its command, its CTXTRACE_* variables), with only the
    addresses moved to loopback and a free port and the app swapped for a fixture: the
    one declared metrics port serves the gunicorn master's series and each worker's."""
    try:
        import gunicorn  # noqa: F401, PLC0415 - probing only
    except ImportError:
        missing("gunicorn is not installed; install the test extra: pip install -e '.[test]'")
    entry = container(manifests)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {item["name"]: item["value"] for item in entry["env"]}
    env[PREFIX + "PROMETHEUS_HOST"] = "127.0.0.1"  # the pod's address there, loopback here
    env[PREFIX + "PROMETHEUS_PORT"] = str(port)
    command = list(entry["command"])
    command[command.index("ctxtrace")] = str(BIN / "ctxtrace")
    command[command.index("gunicorn")] = str(BIN / "gunicorn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        command[command.index("--bind") + 1] = f"127.0.0.1:{sock.getsockname()[1]}"
    command[-1] = "tests.fixtures.telemetry_app:app"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    # HOME: gunicorn's control socket (~/.gunicorn) in a folder of this test's own.
    environ.update(env, PYTHONPATH=str(paths["repo"]), HOME=str(tmp_path))
    log = tmp_path / "gunicorn.log"
    processes_in_pod = int(config["kubernetes"]["workers"]) + 1
    with livestack.Processes() as processes:
        server = processes.start(command, log, env=environ, cwd=paths["repo"], group=True)
        livestack.wait_for(
            "the master and every worker on the metrics port",
            lambda: len(workers_on(port)) == processes_in_pod, [log], 30,
        )
        workers = workers_on(port)
    assert server.returncode == 0, livestack.tails([log])
    roles = Counter(worker.rsplit(":", 1)[1] for worker in workers)
    assert roles == {"gunicorn-master": 1, "gunicorn": processes_in_pod - 1}
    assert any(worker.endswith(f":{server.pid}:gunicorn-master") for worker in workers)
