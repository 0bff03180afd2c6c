"""The deploy files parse and hang together (no Docker engine runs here), and the
`healthcheck` command the container image uses works against a live gateway."""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def test_observability_compose_wires_gateway_collector_and_jaeger():
    compose = yaml.safe_load((DEPLOY / "observability" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"gateway", "otel-collector", "jaeger"}
    gw = services["gateway"]
    assert gw["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / "observability" / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
    assert gw["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    # Published only on loopback: open auth is never exposed beyond the host.
    assert all(p.startswith("127.0.0.1:") for p in gw["ports"])

    collector = yaml.safe_load((DEPLOY / "observability" / "otel-collector.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    jaeger_exporters = [e for e in pipeline["exporters"] if e.startswith("otlp/")]
    assert jaeger_exporters and collector["exporters"][jaeger_exporters[0]]["endpoint"] == "jaeger:4317"
    mount = services["otel-collector"]["volumes"][0].split(":")[0]
    assert (DEPLOY / "observability" / mount).resolve() == (DEPLOY / "observability" / "otel-collector.yaml").resolve()


def test_dockerfile_copies_what_the_build_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M))
    sources = {p for line in copied for p in line.split()}
    # Every bench target in Cargo.toml must exist in the build context, or cargo refuses.
    assert "benches" in sources and "src" in sources and "Cargo.lock" in sources
    assert "USER nonroot" in text and "HEALTHCHECK" in text


def test_systemd_unit_runs_check_before_serve():
    unit = (DEPLOY / "systemd" / "poe-gateway.service").read_text()
    assert "ExecStartPre=/usr/local/bin/poe-gateway check" in unit
    assert "ExecStart=/usr/local/bin/poe-gateway serve" in unit


def test_healthcheck_command(gateway):
    bin_path = os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")
    env = {"PATH": os.environ.get("PATH", ""), "POE_GATEWAY_LISTEN": f"127.0.0.1:{gateway.port}"}
    assert subprocess.run([bin_path, "healthcheck"], env=env, timeout=10).returncode == 0
    # Nothing listening on port 1: unhealthy.
    env["POE_GATEWAY_LISTEN"] = "127.0.0.1:1"
    assert subprocess.run([bin_path, "healthcheck"], env=env, timeout=10, capture_output=True).returncode != 0
