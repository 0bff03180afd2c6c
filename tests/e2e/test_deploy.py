"""The deploy files parse and hang together (no Docker engine or cluster runs here), and the
`healthcheck` command the container image uses works against a live gateway.

- Every YAML file under deploy/ parses; the Kubernetes manifests pass the API's JSON schemas
  (kubernetes-validate, offline, strict) and the compose files the compose-spec schema
  (check-jsonschema's vendored copy, offline).
- Names that must agree across files do: Service, PDB and HPA against the Deployment, probes
  against the container port, secretKeyRefs against the Secret template, nginx upstreams and
  Prometheus targets against the compose services, the policy file path against its mount.
- The policy in the ConfigMap, and the env of the compose gateways, pass `poe-gateway check`.
- nginx accepts deploy/nginx/nginx.conf (`nginx -t`), where nginx is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
LABELS = {"app.kubernetes.io/name": "poe-gateway", "app.kubernetes.io/component": "gateway"}
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from 1.30).
K8S_MIN_VERSION = "1.30"
# How long the ledger may take to write at the end of a shutdown, as src/http/mod.rs says.
LEDGER_CLOSE_WAIT_S = int(
    re.search(
        r"LEDGER_CLOSE_WAIT: Duration = Duration::from_secs\((\d+)\)",
        (REPO_ROOT / "src" / "http" / "mod.rs").read_text(),
    ).group(1)
)


def _bin() -> str:
    path = os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        pytest.fail(f"gateway binary not found or not executable: {path} (build it or set POE_GATEWAY_BIN)")
    return path


def _load_toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(text)


def _seconds(value) -> float:
    """A policy duration: a plain number of seconds or a humantime string ("30s", "1m 30s", "250ms")."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value.strip())
    assert parts and "".join(f"{n}{u}" for n, u in parts) == re.sub(r"\s+", "", value), value
    return sum(float(n) * units[u] for n, u in parts)


def _default_policy() -> dict:
    return _load_toml((REPO_ROOT / "policies" / "default.toml").read_text())


def _k8s() -> dict[str, dict]:
    """The manifests by kind (one object of each kind)."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects in deploy/k8s"
                out[doc["kind"]] = doc
    return out


def _container(k8s: dict) -> dict:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _gateway_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if re.fullmatch(r"gateway-\d+", name)}


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, enough for our files."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = env.get(name, "")
        if op == ":?" and not have:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        if op == ":-" and not have:
            return arg
        return have

    return re.sub(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


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
    # The slim build image has gcc but no make, which jemalloc's build script runs.
    build_stage = text.split("\nFROM ")[1]
    assert re.search(r"apt-get install[^\n]*\bmake\b", build_stage), "the build stage must install make"


def test_systemd_unit_runs_check_before_serve():
    unit = (DEPLOY / "systemd" / "poe-gateway.service").read_text()
    assert "ExecStartPre=/usr/local/bin/poe-gateway check" in unit
    assert "ExecStart=/usr/local/bin/poe-gateway serve" in unit


def test_healthcheck_command(gateway):
    bin_path = _bin()
    env = {"PATH": os.environ.get("PATH", ""), "POE_GATEWAY_LISTEN": f"127.0.0.1:{gateway.port}"}
    assert subprocess.run([bin_path, "healthcheck"], env=env, timeout=10).returncode == 0
    # Nothing listening on port 1: unhealthy.
    env["POE_GATEWAY_LISTEN"] = "127.0.0.1:1"
    assert subprocess.run([bin_path, "healthcheck"], env=env, timeout=10, capture_output=True).returncode != 0


# --------------------------------------------------------------------------
# Every file parses and matches its schema
# --------------------------------------------------------------------------


def test_every_yaml_file_in_deploy_parses():
    paths = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    assert len(paths) >= 10, paths
    for path in paths:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_k8s_manifests_match_the_kubernetes_schemas():
    import kubernetes_validate

    k8s = _k8s()
    assert set(k8s) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Kustomization"}
    for kind, doc in k8s.items():
        if kind == "Kustomization":  # kustomize's own file, not a cluster object
            continue
        assert "namespace" not in doc["metadata"], f"{kind}: the manifests stay namespace-agnostic"
        for version in (K8S_MIN_VERSION, kubernetes_validate.latest_version()):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{kind} is not valid for Kubernetes {version}: {path}: {e.message}")


def test_compose_files_match_the_compose_spec():
    files = [DEPLOY / "compose.yaml", DEPLOY / "observability" / "compose.yaml"]
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_kustomization_lists_the_manifests_but_not_the_secret_template():
    kustomization = _k8s()["Kustomization"]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # An apply must never overwrite the real Secret with the template's placeholders.
    assert listed == present - {"secret.example.yaml"}
    image = _container(_k8s())["image"]
    assert any(i["name"] == image.rsplit(":", 1)[0] for i in kustomization["images"])


# --------------------------------------------------------------------------
# Kubernetes: the objects refer to each other correctly
# --------------------------------------------------------------------------


def test_k8s_selectors_ports_and_probes_agree():
    k8s = _k8s()
    dep = k8s["Deployment"]
    pod = dep["spec"]["template"]
    c = _container(k8s)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"] == LABELS
    assert pod["metadata"]["labels"].items() >= LABELS.items()

    svc = k8s["Service"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    def port_of(ref) -> int:
        return ports[ref] if isinstance(ref, str) else ref

    assert port_of(svc["spec"]["ports"][0]["targetPort"]) == 8080
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert port_of(c[probe]["httpGet"]["port"]) == 8080, probe

    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["POE_GATEWAY_LISTEN"] == "0.0.0.0:8080"
    policy = _load_toml(k8s["ConfigMap"]["data"]["policies.toml"])
    assert policy["server"]["listen"].rsplit(":", 1)[1] == "8080"
    assert policy["auth"]["mode"] == "keys"

    pdb = k8s["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    hpa = k8s["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"


def test_k8s_pod_runs_locked_down():
    k8s = _k8s()
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    c = _container(k8s)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Service links would put POE_GATEWAY_SERVICE_HOST & co. into the gateway's env namespace.
    assert spec["enableServiceLinks"] is False
    assert c["resources"]["limits"]["memory"]
    assert re.fullmatch(r"ghcr\.io/OWNER/poe-gateway:\d+\.\d+\.\d+", c["image"]), "the documented placeholder"


def test_termination_grace_covers_prestop_and_shutdown_grace():
    k8s = _k8s()
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    policy = _load_toml(k8s["ConfigMap"]["data"]["policies.toml"])
    grace = _seconds(policy.get("server", {}).get("shutdown_grace", _default_policy()["server"]["shutdown_grace"]))
    delay = _seconds(policy.get("server", {}).get("shutdown_delay", _default_policy()["server"]["shutdown_delay"]))
    pre_stop = _container(k8s)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    # The period counts from the start of preStop; SIGTERM (and the drain) only follows it.
    # After the drain the ledger may take LEDGER_CLOSE_WAIT (src/http/mod.rs) to write.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + delay + grace + LEDGER_CLOSE_WAIT_S


def test_systemd_and_compose_wait_out_the_shutdown():
    policy = _default_policy()["server"]
    needed = _seconds(policy["shutdown_delay"]) + _seconds(policy["shutdown_grace"]) + LEDGER_CLOSE_WAIT_S
    unit = (DEPLOY / "systemd" / "poe-gateway.service").read_text()
    (stop,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("TimeoutStopSec=")]
    assert int(stop) > needed
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if "poe-gateway" in str(service.get("image", "")) or "build" in service:
            assert _seconds(service["stop_grace_period"]) > needed, name


def test_every_secret_ref_names_a_key_of_the_secret():
    k8s = _k8s()
    secret = k8s["Secret"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    refs = [
        (e["name"], e["valueFrom"]["secretKeyRef"])
        for e in _container(k8s)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert {name for name, _ in refs} == {
        "POE_API_KEY",
        "POE_GATEWAY_ADMIN_KEY",
        "POE_GATEWAY_DATABASE_URL",
        "POE_GATEWAY_REDIS_URL",
    }
    for name, ref in refs:
        assert ref["name"] == secret["metadata"]["name"], name
        assert ref["key"] in keys, f"{name}: the Secret has no key {ref['key']}"
    # A template: no value in it is a usable key.
    assert all("REPLACE" in v for k, v in secret["stringData"].items() if k in {"POE_API_KEY", "POE_GATEWAY_ADMIN_KEY"})


def test_policy_file_is_mounted_where_the_gateway_reads_it():
    k8s = _k8s()
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    c = _container(k8s)
    env = {e["name"]: e.get("value") for e in c["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = []
    for mount in c["volumeMounts"]:
        cm = volumes[mount["name"]].get("configMap")
        if not cm:
            continue
        assert cm["name"] == k8s["ConfigMap"]["metadata"]["name"]
        for item in cm["items"]:
            assert item["key"] in k8s["ConfigMap"]["data"]
            found.append(str(Path(mount["mountPath"]) / item["path"]))
    assert env["POE_GATEWAY_POLICIES"] in found
    # The same path the image's own ENV names, so a mounted file overrides the baked-in one.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"POE_GATEWAY_POLICIES={env['POE_GATEWAY_POLICIES']}" in dockerfile


def _check(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.run([_bin(), "check"], env=full, cwd=cwd, capture_output=True, text=True, timeout=30)


def test_configmap_policy_passes_poe_gateway_check(tmp_path):
    k8s = _k8s()
    policies = tmp_path / "policies.toml"
    policies.write_text(k8s["ConfigMap"]["data"]["policies.toml"])
    secret = k8s["Secret"]["stringData"]
    env: dict[str, str] = {}
    for e in _container(k8s)["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    env["POE_GATEWAY_POLICIES"] = str(policies)
    run = _check(env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "listen 0.0.0.0:8080, auth keys" in run.stdout, run.stdout

    # The check is real: the same file on a network address with open auth is refused.
    policies.write_text(k8s["ConfigMap"]["data"]["policies.toml"].replace('mode = "keys"', 'mode = "open"'))
    assert _check(env, tmp_path).returncode != 0


# --------------------------------------------------------------------------
# Compose: two gateways behind nginx, Postgres, Redis, collector, Jaeger, Prometheus
# --------------------------------------------------------------------------


def test_compose_gateways_share_postgres_and_redis():
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {"nginx", "postgres", "redis", "otel-collector", "jaeger", "prometheus"}
    gateways = _gateway_services(compose)
    assert len(gateways) == 2
    pg = services["postgres"]["environment"]
    grace = _seconds(_default_policy()["server"]["shutdown_grace"])
    for name, gw in gateways.items():
        env = gw["environment"]
        assert gw["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
        assert env["POE_GATEWAY_LISTEN"] == "0.0.0.0:8080"
        assert env["POE_GATEWAY_AUTH__MODE"] == "keys"
        assert env["POE_GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        db = re.fullmatch(r"postgres://(\w+):(\$\{[^}]+\})@(\w+):5432/(\w+)", env["POE_GATEWAY_DATABASE_URL"])
        assert db, env["POE_GATEWAY_DATABASE_URL"]
        assert (db[1], db[3], db[4]) == (pg["POSTGRES_USER"], "postgres", pg["POSTGRES_DB"])
        assert db[2].split(":")[0] == pg["POSTGRES_PASSWORD"].split(":")[0], "one password for both sides"
        # Secrets come from the environment or deploy/.env, never from the file.
        for secret in ("POE_API_KEY", "POE_GATEWAY_ADMIN_KEY"):
            assert re.fullmatch(r"\$\{" + secret + r":\?[^}]*\}", env[secret]), (name, secret)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == f"service.instance.id={name}"
        for dep in ("postgres", "redis"):
            assert gw["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
            assert services[dep]["healthcheck"]["test"]
        assert gw["healthcheck"]["test"] == ["CMD", "/usr/local/bin/poe-gateway", "healthcheck"]
        assert "ports" not in gw, "replicas are reached through nginx only"
        assert _seconds(gw["stop_grace_period"]) > grace
    mount = services["otel-collector"]["volumes"][0].split(":")[0]
    assert (DEPLOY / mount).resolve() == (DEPLOY / "observability" / "otel-collector.yaml").resolve()
    # Everything published is on loopback, except nginx, whose address is the operator's choice.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:") or name == "nginx", (name, port)
    assert services["nginx"]["ports"] == ["${GATEWAY_PUBLISH:-127.0.0.1:8080}:8080"]


def test_compose_gateway_env_passes_poe_gateway_check(tmp_path):
    shell = {"POE_API_KEY": "test-poe-key", "POE_GATEWAY_ADMIN_KEY": "test-admin-key", "POSTGRES_PASSWORD": "pw"}
    # The image's ENV, then the service's environment on top, as Docker does.
    image_env = dict(re.findall(r"(POE_\w+)=(\S+)", (DEPLOY / "Dockerfile").read_text()))
    assert image_env["POE_GATEWAY_POLICIES"] == "/etc/poe-gateway/policies.toml"
    image_env["POE_GATEWAY_POLICIES"] = str(REPO_ROOT / "policies" / "default.toml")  # what the image copies there
    for name, gw in _gateway_services(_compose()).items():
        env = {**image_env, **{k: _interpolate(str(v), shell) for k, v in gw["environment"].items()}}
        assert env["POE_GATEWAY_DATABASE_URL"] == "postgres://poe:pw@postgres:5432/poe_gateway"
        run = _check(env, tmp_path)
        assert run.returncode == 0, (name, run.stderr)
        assert "listen 0.0.0.0:8080, auth keys" in run.stdout, run.stdout
    with pytest.raises(AssertionError, match="POE_API_KEY"):
        _interpolate(_gateway_services(_compose())["gateway-1"]["environment"]["POE_API_KEY"], {})


def _nginx_upstream_servers(text: str) -> list[str]:
    block = re.search(r"upstream\s+poe_gateway\s*\{(.*?)\}", text, re.S)
    assert block, "no `upstream poe_gateway` block"
    return re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M)


def test_nginx_balances_the_compose_gateways_without_buffering():
    compose = _compose()
    gateways = _gateway_services(compose)
    nginx = compose["services"]["nginx"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == set(gateways)
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert sorted(_nginx_upstream_servers(text)) == sorted(f"{name}:8080" for name in gateways)
    assert re.search(r"^\s*keepalive\s+\d+;", text, re.M)
    assert "proxy_pass http://poe_gateway;" in text
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
        assert directive in text, directive
    # nginx must wait longer than the gateway, so the gateway's own timeout error reaches the client.
    read_timeout = _seconds(re.search(r"proxy_read_timeout\s+(\S+);", text).group(1))
    assert read_timeout > _seconds(_default_policy()["timeouts"]["first_byte"])
    body = re.search(r"client_max_body_size\s+(\d+)m;", text).group(1)
    assert int(body) * 1024 * 1024 > 50 * 1024 * 1024  # server.max_body_bytes = 50MiB


def test_prometheus_scrapes_every_compose_gateway():
    compose = _compose()
    gateways = _gateway_services(compose)
    prom_svc = compose["services"]["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_svc["volumes"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "poe-gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    ports = {name: gw["environment"]["POE_GATEWAY_LISTEN"].rsplit(":", 1)[1] for name, gw in gateways.items()}
    assert sorted(targets) == sorted(f"{name}:{port}" for name, port in ports.items())
    # /metrics behind the admin key needs Prometheus to send it.
    for gw in gateways.values():
        if str(gw["environment"].get("POE_GATEWAY_SERVER__METRICS_REQUIRE_ADMIN", "false")).lower() == "true":
            assert job["authorization"]["credentials_file"]


def test_dockerignore_keeps_what_the_build_copies():
    lines = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: target/ and deploy/.env never reach the daemon"
    allowed = {r[1:] for r in rules[1:] if r.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert {p for line in copied for p in line.split()} <= allowed


def test_nginx_accepts_the_config(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not nginx:
        pytest.skip("nginx is not installed")
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    # Compose's service names only resolve on the compose network.
    for server in _nginx_upstream_servers(text):
        host = server.rsplit(":", 1)[0]
        text = text.replace(f"server {host}:", "server 127.0.0.1:")
    # `resolve` on upstream servers is in nginx >= 1.27.3 (the compose file runs 1.28).
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if m and tuple(map(int, m.groups())) < (1, 27, 3):
        text = re.sub(r"(server 127\.0\.0\.1:\d+) resolve;", r"\1;", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    run = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf), "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
