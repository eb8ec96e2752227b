"""deploy/: the linters pass, and the promises no linter checks hold, without a Docker engine.

- The files are linted by their own tools (deploy/lint.sh, also `make lint`): hadolint,
  `docker-compose config`, kubernetes-validate (strict), kubectl kustomize and promtool where
  installed. A missing required tool skips locally and fails in CI (CI=true).
- The images (Dockerfiles read by `dockerfile`, Docker's own parser): non-root, HEALTHCHECK on
  /health, /models volume, flags from the environment, installed as the Makefile installs (asked
  of `make -n`), kernels for sm_80/sm_90a.
- Compose, Prometheus, Grafana and Kubernetes are wired to each other: ports on loopback by default,
  the scrape target is the service, probes hit /health and /ready, the pods run as the image's user.
- Every metric the Grafana dashboard queries (parsed by a PromQL parser) is exported: ours by
  :class:`~kivi_serve.server.metrics.ServerMetrics`, rendered here in process, vLLM's by vLLM 0.32.
- Every ``KIVI_SERVE_*`` the files set is a server setting; docs/deploy.md's sizing table is
  what PageLayout computes.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import promql_parser as promql
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"gpu": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kivi-serve.json"
K8S = DEPLOY / "k8s"

#: The UID:GID the images run as; the Kubernetes securityContext must use the same.
IMAGE_UID = 10001
SERVER_PORT = 8000
PROMETHEUS_PORT = 9090
#: Labels Prometheus attaches at scrape time: never in the server's exposition.
TARGET_LABELS = {"instance", "job", "service"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, timeout=180, **kw)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def kivi_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("kivi-serve")}


def k8s_docs() -> dict[str, dict]:
    """The cluster objects of deploy/k8s by "Kind/name" (the kustomization itself is not one)."""
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] != "Kustomization"}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", duration))


# ------------------------------------------------------------------------------------------ linters
def test_deploy_files_pass_their_linters():
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    result = run(["bash", str(DEPLOY / "lint.sh")], env=env)
    if result.returncode != 0 and "is not installed" in result.stderr and not os.environ.get("CI"):
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- the images
@dataclass
class Image:
    """A Dockerfile's global ARGs and its stages' instructions (``dockerfile.Command`` tuples)."""

    args: dict[str, str]
    stages: list[list]

    @classmethod
    def read(cls, path: Path) -> Image:
        commands = dockerfile.parse_file(str(path))
        args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
        stages: list[list] = []
        for c in commands:
            if c.cmd == "FROM":
                stages.append([])
            if stages:
                stages[-1].append(c)
        return cls(args, stages)

    def stage(self, name: str) -> list:
        return next(s for s in self.stages if s[0].value[-1] == name)

    @staticmethod
    def all(stage: list, cmd: str) -> list:
        return [c for c in stage if c.cmd == cmd]

    @staticmethod
    def env(stage: list) -> dict[str, str]:
        values = [v for c in stage if c.cmd == "ENV" for v in c.value]
        return dict(zip(values[::2], values[1::2]))

    @staticmethod
    def runs(stage: list) -> str:
        return "\n".join(" ".join(c.value) for c in stage if c.cmd == "RUN")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_runs_non_root_with_a_healthcheck_a_model_volume_and_env_flags(kind):
    image = Image.read(DOCKERFILES[kind])
    assert len(image.stages) >= 2, "multi-stage: no compilers or caches in the runtime image"
    final = image.stages[-1]
    (user,) = [c.value[0] for c in Image.all(final, "USER")]
    assert user == f"{IMAGE_UID}:{IMAGE_UID}", "numeric, so that Kubernetes' runAsNonRoot can check it"
    assert f"--uid {IMAGE_UID}" in Image.runs(final) and f"--gid {IMAGE_UID}" in Image.runs(final)
    (health,) = Image.all(final, "HEALTHCHECK")
    assert health.value[1:] == ("python", "/opt/kivi-serve/src/deploy/healthcheck.py", "/health")
    assert any(f.startswith("--start-period=") for f in health.flags)
    assert [c.value for c in Image.all(final, "VOLUME")] == [("/models",)]
    env = Image.env(final)
    assert env["HF_HOME"].startswith("/models/"), "hub downloads must land on the model volume"
    assert [c.value for c in Image.all(final, "EXPOSE")] == [(env["KIVI_SERVE_PORT"],)] == [("8000",)]
    assert env["KIVI_SERVE_HOST"] == "0.0.0.0", "inside a container the server must listen beyond loopback"
    assert not any("API_KEY" in key for key in env), "no secret is baked into the image"
    (entry,) = Image.all(final, "ENTRYPOINT")
    assert entry.value[-2:] == ("kivi-serve", "serve"), "flags come from KIVI_SERVE_* or CMD"
    copied = {c.value[-1]: c.flags for c in Image.all(final, "COPY") if "--from=build" in c.flags}
    assert {"/opt/venv", "/opt/kivi-serve/src", "/opt/kivi-serve/cache"} <= set(copied)
    assert "--chown=kivi:kivi" in copied["/opt/kivi-serve/cache"], "the server owns its cache"
    assert Image.env(image.stage("build"))["KIVI_SERVE_CACHE"] == env["KIVI_SERVE_CACHE"]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_installs_exactly_as_the_makefile(kind):
    """The pip upgrade, install.sh and the model step, as `make -n` prints them; only --dev differs."""
    dry = run(["make", "-n", "-B", "install", "model", f"KIND={kind}", "VENV=/opt/venv"])
    assert dry.returncode == 0, dry.stderr
    recipe = [line for line in dry.stdout.splitlines() if not line.startswith(("make", "python3"))]
    assert any(line.endswith(f"install.sh {kind} --dev") for line in recipe), "CI installs the dev extra"
    build = Image.runs(Image.read(DOCKERFILES[kind]).stage("build"))
    for line in recipe:
        line = line.removesuffix(" --dev").replace("/opt/venv/bin/kivi-serve", "kivi-serve")
        assert line in build, f"{DOCKERFILES[kind].name} does not run `{line}` as the Makefile does"


def test_gpu_image_cuda13_python311_and_kernels_for_sm80_sm90a():
    image = Image.read(DOCKERFILES["gpu"])
    assert image.args["CUDA_VERSION"].startswith("13.") and image.args["PYTHON_VERSION"] == "3.11"
    final = image.stages[-1]
    assert final[0].value[0] == "nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_VERSION}"
    # The loader keys cubins on the compiler and uses, at run time, the one the container has: NVRTC
    # and the CUDA headers (no nvcc). So the build compiles with NVRTC.
    build = Image.runs(image.stage("build"))
    assert "deploy/precompile_kernels.py --arch sm_80 --arch sm_90a --backend nvrtc" in build
    copies = [c.value for c in Image.all(final, "COPY")]
    assert ("/usr/local/cuda/include", Image.env(final)["KIVI_SERVE_CUDA_INCLUDE"]) in copies
    assert "cuda-nvcc" not in Image.runs(final)
    assert ("/opt/python", "/opt/python") in copies, "the venv's interpreter (uv's CPython 3.11)"


def test_cpu_image_bakes_in_the_embedded_model():
    image = Image.read(DOCKERFILES["cpu"])
    assert image.args["PYTHON_IMAGE"].startswith("python:3.11-")
    assert all(stage[0].value[0] == "${PYTHON_IMAGE}" for stage in image.stages)
    assert "kivi-serve model prepare" in Image.runs(image.stage("build"))
    env = Image.env(image.stages[-1])
    assert "KIVI_SERVE_MODEL" not in env, "unset KIVI_SERVE_MODEL serves the baked-in embedded model"
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0, "vLLM on CPU refuses to start without a KV budget"


def test_cpu_image_ships_the_cpu_kernels_prebuilt_and_no_compiler():
    """The runtime stage has no compiler (it would fall back to the PyTorch reference): the build
    stage installs g++ and precompiles the C++ CPU kernels into the cache the runtime copies."""
    image = Image.read(DOCKERFILES["cpu"])
    build = Image.runs(image.stage("build"))
    assert re.search(r"apt-get install [^&]*\bg\+\+", build), "the build stage needs a C++ compiler"
    assert "python deploy/precompile_kernels.py --cpu" in build
    assert build.index("deploy/install.sh") < build.index("precompile_kernels.py --cpu"), "kivi_serve first"
    final = image.stages[-1]
    assert not re.search(r"\b(g\+\+|gcc|clang|build-essential)\b", Image.runs(final))
    copied = [c.value for c in Image.all(final, "COPY") if "--from=build" in c.flags]
    cache = Image.env(image.stage("build"))["KIVI_SERVE_CACHE"]
    assert (cache, cache) in copied, "the prebuilt kernels live in the cache the runtime stage copies"


def test_dockerignore_lets_in_what_the_images_use():
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "kivi_serve/", "cuda/", "configs/"} <= allowed
    for path in DOCKERFILES.values():
        for ref in set(re.findall(r"\bdeploy/[\w.]+\.(?:py|sh)\b", path.read_text())):
            assert (ROOT / ref).is_file() and ref in allowed, f"{path.name} uses {ref}"


def test_precompile_script_calls_the_loader():
    script = str(DEPLOY / "precompile_kernels.py")
    plan = run(
        [sys.executable, script, "--arch", "sm_80", "--arch", "sm_90a", "--backend", "nvrtc", "--dry-run"]
    )
    assert plan.returncode == 0, plan.stderr
    call = "kivi_serve.kernels.loader.precompile(archs=['sm_80', 'sm_90a'], backend='nvrtc')"
    assert plan.stdout == f"[precompile_kernels] {call}\n"
    bad = run([sys.executable, script, "--arch", "sm80"])
    assert bad.returncode == 2 and "not a CUDA architecture" in bad.stderr
    cpu = run([sys.executable, script, "--cpu", "--dry-run"])
    assert cpu.returncode == 0, cpu.stderr
    isas = "('avx512', 'avx2', 'scalar')"
    assert cpu.stdout == f"[precompile_kernels] kivi_serve.kernels.cpu.loader.precompile(isas={isas})\n"
    none = run([sys.executable, script])
    assert none.returncode == 2 and "nothing to compile" in none.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, code", [(200, 0), (503, 1)])
def test_healthcheck_script(status, code):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"status": status}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "KIVI_SERVE_PORT": str(server.server_address[1])}
    env.pop("KIVI_SERVE_HEALTHCHECK_URL", None)
    try:
        result = run([sys.executable, str(DEPLOY / "healthcheck.py"), "/health"], env=env)
        assert result.returncode == code, result.stderr
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening any more: unhealthy, not a traceback.
    result = run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------ compose, Prometheus, Grafana
def test_compose_services_profiles_loopback_ports_volumes_healthchecks(compose):
    services = compose["services"]
    kivi = kivi_services(compose)
    assert {name: svc["profiles"] for name, svc in kivi.items()} == {
        "kivi-serve-cpu": ["cpu"],
        "kivi-serve-gpu": ["gpu"],
    }
    assert {"prometheus", "grafana"} <= set(services) and not services["prometheus"].get("profiles")
    for name, svc in kivi.items():
        built_from = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert built_from == DOCKERFILES[svc["profiles"][0]], name
        env = svc["environment"]
        assert env["KIVI_SERVE_PORT"] == str(SERVER_PORT) and env["KIVI_SERVE_HOST"] == "0.0.0.0"
        assert all(v is None for k, v in env.items() if "API_KEY" in k), "no key in the file"
        assert env["KIVI_SERVE_MODEL"] is None, "unset: the server's default"
        assert "models:/models" in svc["volumes"]
        assert svc["healthcheck"]["test"][-1] == "/health"
        assert "kivi-serve" in svc["networks"]["default"]["aliases"]
    devices = kivi["kivi-serve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for port in svc.get("ports", []):
            assert port.startswith("${KIVI_SERVE_BIND:-127.0.0.1}:"), f"{name} publishes beyond loopback"


def test_prometheus_scrapes_the_kivi_serve_service(compose):
    config = load_yaml(DEPLOY / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "kivi-serve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.rsplit(":", 1)
    for name, svc in kivi_services(compose).items():
        assert host in svc["networks"]["default"]["aliases"], f"{name} does not answer to {host}"
        assert port == svc["environment"]["KIVI_SERVE_PORT"] and svc["ports"][0].endswith(":" + port)
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_grafana_reads_the_provisioned_prometheus_and_the_mounted_dashboards(compose):
    datasources = {
        ds["uid"]: ds
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))
        for ds in load_yaml(path)["datasources"]
    }
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    for ds in datasources.values():
        assert ds["url"] == f"http://prometheus:{PROMETHEUS_PORT}", ds
    for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yaml")):
        for provider in load_yaml(path)["providers"]:
            assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/var/lib/grafana/dashboards/{DASHBOARD.name}"
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in all_panels(board) if p["type"] != "row"]
    refs = [p["datasource"] for p in panels] + [t["datasource"] for p in panels for t in p["targets"]]
    assert refs and all(ref["uid"] in datasources for ref in refs), "a panel's datasource is not provisioned"


# -------------------------------------------------------------------- dashboard queries → metrics
#: Grafana's variables, replaced by something PromQL accepts before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


@dataclass(frozen=True)
class Selector:
    """One vector selector of a dashboard query: the metric and the label matchers it needs."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    where: str


def all_panels(board: dict) -> list[dict]:
    return [q for p in board["panels"] for q in [p, *p.get("panels", [])]]  # rows keep their panels


def queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    out = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in all_panels(board)
        for t in p.get("targets", [])
    ]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            out.append((f"variable {var['name']!r}", match.group(1) if match else query))
    return out


def dashboard_selectors(board: dict | None = None) -> list[Selector]:
    """Every metric selector in the dashboard, parsed by a real PromQL parser (PyPI promql-parser)."""
    board = json.loads(DASHBOARD.read_text()) if board is None else board
    found: list[Selector] = []
    for where, expr in queries(board):
        text = expr
        for var, value in GRAFANA_VARIABLES.items():
            text = text.replace(var, value)
        assert "$" not in text, f"{where}: unknown Grafana variable in {expr!r}"
        try:
            ast = promql.parse(text)
        except Exception as exc:  # the parser raises its own error types
            raise AssertionError(f"{where}: PromQL does not parse: {expr!r}: {exc}") from None

        def visit(node, where=where):
            if isinstance(node, promql.VectorSelector):
                assert node.name, f"{where}: a selector without a metric name"
                matchers = tuple(
                    (m.name, str(m.op).rsplit(".", 1)[-1], m.value)
                    for m in node.matchers.matchers
                    if m.name != "__name__"
                )
                found.append(Selector(node.name, matchers, where))
            return True

        promql.walk(ast, visit)
    return found


def missing_from(samples: list, prefix: str = "") -> list[str]:
    """What the dashboard queries (metrics starting with ``prefix``) that a scrape's ``samples`` lack."""
    series: dict[str, list[dict]] = {}
    for s in samples:
        series.setdefault(s.name, []).append(s.labels)
    missing = []
    for sel in dashboard_selectors():
        if not sel.metric.startswith(prefix):
            continue
        found = series.get(sel.metric)
        if not found:
            missing.append(f"{sel.where}: {sel.metric}")
            continue
        for label, op, value in sel.matchers:
            if label in TARGET_LABELS:
                continue  # added by Prometheus at scrape time
            if not any(label in s for s in found):
                missing.append(f"{sel.where}: {sel.metric} has no label {label!r}")
            elif op == "Equal" and not any(s.get(label) == value for s in found):
                missing.append(f"{sel.where}: {sel.metric} has no series {label}={value!r}")
    return missing


def server_exposition() -> str:
    """What /metrics shows of ours once the engine reported its cache and one request was served."""
    from server_harness import FAKE_FACTS

    from kivi_serve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.facts, metrics.engine_ready, metrics.model_name = FAKE_FACTS, True, "smollm2"
    metrics.observe_request("/v1/completions", 200)
    metrics.observe_generation(0.1, 0.5, 4, 3, 0.05)
    return metrics.render().decode()


def test_dashboard_shows_what_the_issue_asks_for():
    selectors = dashboard_selectors()
    used = {s.metric for s in selectors}
    for metric in (
        "kivi_kv_capacity_tokens",
        "kivi_kv_bits_per_element",
        "kivi_kv_compression_ratio",
        "kivi_staging_slots_in_use",
        "kivi_staging_slots_total",
        "kivi_requests_running",
        "kivi_requests_waiting",
        "kivi_requests_total",
    ):
        assert metric in used, f"the dashboard does not show {metric}"
    states = {
        m[2] for s in selectors if s.metric == "kivi_kv_cache_bytes" for m in s.matchers if m[0] == "state"
    }
    assert {"used", "free"} <= states, "KV bytes used and free"
    by_status = [
        m for s in selectors if s.metric == "kivi_requests_total" for m in s.matchers if m[0] == "status"
    ]
    assert by_status and all(m[1] == "Re" for m in by_status), "error rate by status"
    exprs = [e for _, e in queries(json.loads(DASHBOARD.read_text()))]
    for hist in ("kivi_request_ttft_seconds", "kivi_request_tpot_seconds", "kivi_request_e2e_seconds"):
        for q in ("0.5", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{hist}_bucket" in e for e in exprs), (hist, q)


def test_every_kivi_metric_of_the_dashboard_is_exported_by_the_server():
    from kivi_serve.bench.server_process import metric_samples

    missing = missing_from(metric_samples(server_exposition()), prefix="kivi_")
    assert not missing, "dashboard queries metrics the server does not export:\n" + "\n".join(missing)


def test_every_vllm_metric_of_the_dashboard_exists_in_vllm():
    """Sample names vLLM 0.32's Prometheus logger defines, read from its source (no vLLM import)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    found = re.findall(r"self\._(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[\w:]+)\"", source)
    assert len(found) > 20, "vLLM's logger source changed shape; update this parser"
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    defined = {name.removesuffix("_total") + s for kind, name in found for s in suffixes[kind]}
    for sel in dashboard_selectors():
        if sel.metric.startswith("vllm:"):
            assert sel.metric in defined, f"{sel.where}: vLLM 0.32 defines no {sel.metric}"


def test_dashboard_check_can_fail():
    from kivi_serve.bench.server_process import metric_samples

    board = json.loads(DASHBOARD.read_text())
    board["panels"][1]["targets"][0]["expr"] = "sum(kivi_kv_cache_bytes{state=}"
    with pytest.raises(AssertionError, match="does not parse"):
        dashboard_selectors(board)
    text = server_exposition()
    dropped = "\n".join(x for x in text.splitlines() if "kivi_kv_capacity_tokens" not in x) + "\n"
    assert any("kivi_kv_capacity_tokens" in m for m in missing_from(metric_samples(dropped), "kivi_"))
    relabelled = text.replace('state="free"', 'state="frei"')
    assert any("state='free'" in m for m in missing_from(metric_samples(relabelled), "kivi_"))


# -------------------------------------------------------------------------------------- Kubernetes
def test_k8s_deployment_probes_resources_security_secret_volumes():
    docs = k8s_docs()
    deploy = docs["Deployment/kivi-serve"]
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVER_PORT}
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["KIVI_SERVE_PORT"]["value"] == str(SERVER_PORT) and env["KIVI_SERVE_HOST"]["value"] == "0.0.0.0"
    )
    for probe, path in (
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == SERVER_PORT, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading takes minutes"
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert env["KIVI_SERVE_TENSOR_PARALLEL_SIZE"]["value"] == res["limits"]["nvidia.com/gpu"], (
        "a GPU per rank"
    )
    pod_sec, sec = spec["securityContext"], container["securityContext"]
    assert pod_sec["runAsNonRoot"] and pod_sec["runAsUser"] == pod_sec["runAsGroup"] == IMAGE_UID
    assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    ref = env["KIVI_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = docs[f"Secret/{ref['name']}"]
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in docs
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert env["KIVI_SERVE_MODEL"]["value"].startswith("/models/")
    assert spec["terminationGracePeriodSeconds"] >= 60, "time for in-flight requests after SIGTERM"


def test_k8s_service_scrape_annotations_servicemonitor_and_kustomization():
    docs = k8s_docs()
    deploy, service, monitor = (docs[f"{k}/kivi-serve"] for k in ("Deployment", "Service", "ServiceMonitor"))
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == SERVER_PORT
    for notes in (deploy["spec"]["template"]["metadata"]["annotations"], service["metadata"]["annotations"]):
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert notes["prometheus.io/port"] == str(SERVER_PORT)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert listed == on_disk, "every core manifest is in the kustomization (the ServiceMonitor needs its CRD)"


# ------------------------------------------------------------------ KIVI_SERVE_* are real settings
#: Not `kivi-serve serve` flags: the cache root, the probe's URL, NVRTC's headers (kernels loader),
#: the CPU kernels' ISA (kivi_serve.kernels.cpu.loader.ENV_ISA).
NON_FLAG_VARIABLES = {
    "KIVI_SERVE_CACHE",
    "KIVI_SERVE_HEALTHCHECK_URL",
    "KIVI_SERVE_CUDA_INCLUDE",
    "KIVI_SERVE_CPU_ISA",
}


def test_every_kivi_serve_variable_is_a_server_setting(compose):
    """A misspelt KIVI_SERVE_* in an image, compose, Kubernetes or the docs would be silently ignored."""
    from kivi_serve.server.settings import ENV_PREFIX, ServeSettings

    known = {ENV_PREFIX + name.upper() for name in ServeSettings.model_fields} | NON_FLAG_VARIABLES
    used: dict[str, str] = {}
    for path in DOCKERFILES.values():
        for stage in Image.read(path).stages:
            used.update(dict.fromkeys(Image.env(stage), path.name))
    for name, svc in compose["services"].items():
        used.update(dict.fromkeys(svc.get("environment", {}), f"compose {name}"))
    for doc in k8s_docs().values():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            used.update({e["name"]: "k8s" for e in container.get("env", [])})
    docs = (ROOT / "docs" / "deploy.md").read_text()
    used.update(dict.fromkeys(re.findall(r"`(KIVI_SERVE_[A-Z_]+)`", docs), "docs"))
    unknown = {
        name: where for name, where in used.items() if name.startswith(ENV_PREFIX) and name not in known
    }
    assert not unknown, f"not `kivi-serve serve` settings: {unknown}"


# -------------------------------------------------------------------------------- docs/deploy.md
SIZING_MODELS = {"Llama-3.1-8B": (32, 8, 128), "SmolLM2-135M": (30, 3, 64)}


def test_deploy_doc_sizing_table_matches_page_layout():
    from kivi_serve.quant.layout import PageLayout

    doc = (ROOT / "docs" / "deploy.md").read_text()
    rows = re.findall(r"^\|\s*([\w.-]+)\s*\|\s*(\d+)\s*\|([^\n]+)\|\s*$", doc, re.M)
    checked = 0
    for model, page, rest in rows:
        if model not in SIZING_MODELS:
            continue
        layers, kv_heads, head_dim = SIZING_MODELS[model]
        layout = PageLayout(head_dim, page_size=int(page))
        bf16 = 2 * layers * kv_heads * head_dim * 2
        ours = layers * kv_heads * layout.slot_bytes
        cells = [c.strip().replace(",", "") for c in rest.split("|")]
        expected = [
            str(bf16),
            str(ours),
            f"{layout.bits_per_element:.3f}",
            str(2**30 // bf16),
            str(2**30 // ours),
            f"{bf16 / ours:.2f}x",
        ]
        assert cells == expected, f"docs/deploy.md sizing row {model} P={page}: {cells} != {expected}"
        checked += 1
    assert checked >= 4, "docs/deploy.md has no sizing table for Llama-3.1-8B and SmolLM2-135M"
