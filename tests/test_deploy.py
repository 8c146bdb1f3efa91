"""Deployment files checked without a Docker engine or a cluster: Dockerfile, .dockerignore, docker-compose.yml,
Prometheus and Grafana provisioning, Kubernetes manifests (DESIGN section 9).

Each test checks that two files agree (a path the Dockerfile copies exists and is in the build context, a probe
names a port the container opens, a dashboard query names a metric the server exports, ...), the mistakes that
otherwise show only when the image is built or the stack deployed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import Settings, env_name, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8000
READY, LIVE = "/v2/health/ready", "/v2/health/live"
PACKAGES = ("models", "export", "server", "loadtest")
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def check_settings(env: dict[str, str], model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's own validation of deployment settings (only LMA_ names it knows; /models -> model_dir)."""
    known = {env_name(f) for f in Settings.model_fields}
    assert set(env) <= known, f"not server settings: {sorted(set(env) - known)}"
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("LMA_MODEL_DIR", str(model_dir))
    return load_settings()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ----------------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    stage: str  # the `AS` name of the stage it belongs to ("" before the first FROM)

    def words(self) -> list[str]:
        """Arguments in JSON (exec) form or shell form; leading --flags are kept."""
        if self.args.startswith("["):
            return list(json.loads(self.args))
        return shlex.split(self.args)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs in our Dockerfile)."""
    instructions, pending, stage = [], "", ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(ROOT / "Dockerfile")


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not `--from=` another stage)."""
    sources = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = ins.words()
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"{ins.keyword} {ins.args}: needs a source and a destination"
        sources += paths[:-1]
    return sources


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative to the context) is excluded: the last matching pattern wins, `!` re-includes,
    and a pattern matching a parent folder excludes everything below it."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                out, i = out + pattern[i : j + 1], j + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s for line in lines if (s := line.strip()) and not s.startswith("#")]


def test_dockerignore_matcher() -> None:
    patterns = ["data", "**/__pycache__", "*.egg-info", "!keep.egg-info"]
    assert dockerignored("data", patterns)
    assert dockerignored("data/x/y.tsv", patterns)
    assert dockerignored("models/__pycache__/a.pyc", patterns)
    assert dockerignored("lma_ctr.egg-info/PKG-INFO", patterns)
    assert not dockerignored("keep.egg-info", patterns)
    assert not dockerignored("database.py", patterns)
    assert not dockerignored("models/data.py", patterns)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "data", "runs", "artifacts", "models/__pycache__/schema.cpython-311.pyc"):
        assert dockerignored(path, patterns), path


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: list[Instruction]) -> None:
    sources = copy_sources(dockerfile)
    assert {s.rstrip("/") for s in sources} >= {
        "pyproject.toml", "constraints.txt", "deploy/locks/serve.txt", "deploy/locks/serve-cpu.txt", *PACKAGES
    }  # fmt: skip
    patterns = dockerignore_patterns()
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not dockerignored(src, patterns), f"Dockerfile copies {src}, which .dockerignore leaves out"


def test_dependency_layer_is_built_before_the_source_is_copied(dockerfile: list[Instruction]) -> None:
    def first(predicate: Any) -> int:
        return next(i for i, ins in enumerate(dockerfile) if predicate(ins))

    copy_locks = first(lambda ins: ins.keyword == "COPY" and "deploy/locks/serve-cpu.txt" in ins.words())
    install_deps = first(lambda ins: ins.keyword == "RUN" and "--require-hashes" in ins.args)
    copy_project = first(lambda ins: ins.keyword == "COPY" and "pyproject.toml" in ins.words())
    copy_source = first(lambda ins: ins.keyword == "COPY" and any(w.rstrip("/") in PACKAGES for w in ins.words()))
    install_project = first(lambda ins: ins.keyword == "RUN" and "pip install --no-deps ." in ins.args)
    # pyproject.toml comes after the dependency layer: a version bump does not reinstall the dependencies
    assert copy_locks < install_deps < copy_project < copy_source < install_project


def test_variants_install_the_serving_set_from_the_lock(dockerfile: list[Instruction]) -> None:
    args = {}
    for ins in dockerfile:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args.setdefault(name, value)
    assert args["VARIANT"] == "cpu"
    stages = {ins.stage: ins.args.split()[0] for ins in dockerfile if ins.keyword == "FROM"}
    assert stages["base"] == "base-${VARIANT}"
    assert stages["base-cpu"] == "${PYTHON_IMAGE}" and args["PYTHON_IMAGE"].startswith("python:3.11")
    assert stages["base-gpu"] == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in args["CUDA_IMAGE"]

    (install,) = [ins.args for ins in dockerfile if ins.keyword == "RUN" and "--require-hashes" in ins.args]
    cases = {k: " ".join(v.split()) for k, v in re.findall(r"(\w+)\) (.*?) ;;", install)}
    # cpu: only the serving set with plain onnxruntime, every file hash-checked, no torch
    assert cases["cpu"] == "pip install --require-hashes -r deploy/locks/serve-cpu.txt"
    # gpu: the serving set as pip resolves it on Linux x86-64, then CUDA torch at the pin of constraints.txt
    assert cases["gpu"] == (
        "pip install --require-hashes -r deploy/locks/serve.txt"
        ' && pip install --index-url "$TORCH_INDEX_GPU" -c constraints.txt torch'
    )
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", args["CUDA_IMAGE"])
    assert cuda, args["CUDA_IMAGE"]
    assert args["TORCH_INDEX_GPU"] == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"
    (check,) = [ins.args for ins in dockerfile if ins.keyword == "RUN" and "pip check" in ins.args]
    assert "find_spec('torch') is not None" in check  # the CPU build fails if torch slipped in


def test_gpu_base_matches_the_cuda_of_onnxruntime_gpu(dockerfile: list[Instruction]) -> None:
    """onnxruntime-gpu wheels are built for one CUDA major version; the image's CUDA must be that one."""
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("onnxruntime (CPU build) installed: nothing to compare")
    image = next(ins.args for ins in dockerfile if ins.keyword == "ARG" and ins.args.startswith("CUDA_IMAGE="))
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", image)
    assert cuda_major and cuda_major[1] == info.cuda_version.split(".")[0], (image, info.cuda_version)


def test_runtime_stage_runs_lma_serve_as_an_unprivileged_user(dockerfile: list[Instruction]) -> None:
    final = dockerfile[-1].stage
    runtime = [ins for ins in dockerfile if ins.stage == final]
    assert final == "runtime"
    users = [ins.args for ins in runtime if ins.keyword == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert [ins.args for ins in runtime if ins.keyword == "EXPOSE"] == [str(PORT)]
    (entrypoint,) = [ins.words() for ins in runtime if ins.keyword == "ENTRYPOINT"]
    assert entrypoint == ["lma", "serve", "/models", "--host", "0.0.0.0", "--port", str(PORT)]
    (healthcheck,) = [ins.args for ins in runtime if ins.keyword == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{PORT}{READY}" in healthcheck
    # the runtime stage takes the virtual environment from the build stage, never the source tree
    assert [ins.words()[-1] for ins in runtime if ins.keyword == "COPY"] == ["/opt/venv"]


def test_entrypoint_command_is_the_lma_console_script(dockerfile: list[Instruction]) -> None:
    from models.main import build_parser

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lma"] == "models.main:main"
    (entrypoint,) = [ins.words() for ins in dockerfile if ins.keyword == "ENTRYPOINT"]
    # `lma serve` exists and accepts the image's arguments plus the ones the k8s Deployment appends
    extra = k8s_objects()["Deployment/lma-server"]["spec"]["template"]["spec"]["containers"][0]["args"]
    args = build_parser().parse_args(entrypoint[1:] + extra)
    assert args.command == "serve" and callable(args.func)


# ----------------------------------------------------------------------------------------------------------
# docker-compose.yml, Prometheus, Grafana


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's relative bind mounts (short syntax `./src:/target[:mode]`)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            out[target] = source
    return out


def test_compose_services(compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    assert set(services) == {"server", "redis", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["context"] == "."
    assert (ROOT / server["build"].get("dockerfile", "Dockerfile")).is_file()
    assert bind_mounts(server) == {"/models": "./artifacts"}
    env = {k: v for k, v in server["environment"].items() if not v.startswith("${")}  # interpolated at `up`
    assert env["LMA_MODEL_DIR"] == "/models"
    settings = check_settings(env, tmp_path, monkeypatch)
    assert settings.redis_url == "redis://redis:6379/0"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert [p.rsplit(":", 1)[1] for p in server["ports"]] == [str(PORT)]


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service).items():
            if source != "./artifacts":  # written by `lma export`, git-ignored
                assert (ROOT / source).exists(), f"{name} mounts {source} at {target}: not in the repository"


def test_prometheus_scrapes_the_server(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert bind_mounts(compose["services"]["prometheus"]) == {
        "/etc/prometheus/prometheus.yml": "./deploy/prometheus/prometheus.yml"
    }
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lma-server"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A" and sd["port"] == PORT


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    mounts = bind_mounts(compose["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    (datasource,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()  # type: ignore[union-attr]
    assert host in compose["services"] and port == "9090"
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/lma.yml")["providers"]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/lma.json"


# ----------------------------------------------------------------------------------------------------------
# Grafana dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/dashboards/lma.json").read_text())


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:lma|process)_[a-z0-9_]+)", expr))


def server_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for every series a server app exports (server/metrics.py is the source)."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import Metrics

    metrics = Metrics()
    labels = {w._name: set(w._labelnames) for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    out = {}
    for family in metrics.registry.collect():  # the lma_ metrics, the process collector, device memory
        for suffix in SAMPLE_SUFFIXES[family.type]:
            out[family.name + suffix] = labels.get(family.name, set()) | ({"le"} if suffix == "_bucket" else set())
    return out


def test_dashboard_queries_use_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = server_metrics()
    assert "process_resident_memory_bytes" in exported and "lma_requests_total" in exported
    used = set().union(*(metric_names(e) for e in queries(dashboard)))
    assert used <= set(exported), f"metrics the server does not export, in lma.json: {sorted(used - set(exported))}"
    required = {
        "lma_requests_total", "lma_request_duration_seconds_bucket", "lma_queue_depth", "lma_batch_size_bucket",
        "lma_inference_duration_seconds_bucket", "lma_rejected_total", "lma_model_memory_bytes",
        "lma_model_compression_ratio", "lma_fallback_tokens_total", "lma_feature_store_duration_seconds_bucket",
        "lma_feature_store_errors_total", "lma_model_reloads_total", "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }  # fmt: skip
    assert required <= used, f"no panel for {sorted(required - used)}"


def test_dashboard_queries_use_existing_labels(dashboard: dict[str, Any]) -> None:
    exported = server_metrics()
    checked = 0
    for expr in queries(dashboard):
        # label matchers: metric{label=~"..."} and grouping: sum by (labels) (rate(metric{...
        uses = [(m, re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel)) for m, sel in re.findall(r"(\w+)\{([^}]*)\}", expr)]
        uses += [
            (m, [s.strip() for s in by.split(",")])
            for by, m in re.findall(r"(?:sum|max|min|avg) by \(([^)]*)\) \((?:rate\(|increase\()?(\w+)", expr)
        ]
        for metric, names in uses:
            unknown = set(names) - exported[metric] - TARGET_LABELS
            assert not unknown, f"{expr}: {metric} has no label {sorted(unknown)}"
            checked += 1
    assert checked >= 40


def test_dashboard_quantiles_keep_the_le_label(dashboard: dict[str, Any]) -> None:
    exprs = [e for e in queries(dashboard) if "histogram_quantile" in e]
    assert len(exprs) >= 8
    for expr in exprs:
        by = re.search(r"sum by \(([^)]*)\) \(rate\(\w+_bucket\{", expr)
        assert by and "le" in [s.strip() for s in by[1].split(",")], expr


def test_dashboard_layout(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"])
    titles = {p["title"] for p in panels}
    assert {"Requests/s by code", "Request latency", "Queue depth", "Batch size", "Model memory by part"} <= titles


# ----------------------------------------------------------------------------------------------------------
# Kubernetes


def k8s_objects() -> dict[str, dict[str, Any]]:
    """`Kind/name` -> object, over every manifest listed by kustomization.yaml."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    objects = {}
    for name in listed:
        for obj in load_yaml_all(K8S / name):
            key = f"{obj['kind']}/{obj['metadata']['name']}"
            assert key not in objects, f"{key} defined twice"
            objects[key] = obj
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return k8s_objects()


def test_k8s_kinds(k8s: dict[str, dict[str, Any]]) -> None:
    assert set(k8s) == {
        "ConfigMap/lma-config", "PersistentVolumeClaim/lma-models", "Deployment/lma-server", "Service/lma-server",
        "HorizontalPodAutoscaler/lma-server", "Deployment/lma-redis", "Service/lma-redis",
        "PodDisruptionBudget/lma-server",
    }  # fmt: skip
    api = {k: o["apiVersion"] for k, o in k8s.items()}
    assert api["Deployment/lma-server"] == "apps/v1"
    assert api["HorizontalPodAutoscaler/lma-server"] == "autoscaling/v2"


def test_k8s_deployment(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment/lma-server"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}

    def probe_target(probe: dict[str, Any]) -> tuple[str, int]:
        port = probe["httpGet"]["port"]
        return probe["httpGet"]["path"], ports[port] if isinstance(port, str) else port

    assert probe_target(container["readinessProbe"]) == (READY, PORT)
    assert probe_target(container["livenessProbe"]) == (LIVE, PORT)
    assert probe_target(container["startupProbe"]) == (LIVE, PORT)
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # settings from the ConfigMap; the model volume is mounted where LMA_MODEL_DIR points
    config = k8s["ConfigMap/lma-config"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[config["data"]["LMA_MODEL_DIR"]]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "lma-models"


def test_k8s_configmap_holds_valid_server_settings(
    k8s: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = k8s["ConfigMap/lma-config"]["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    assert "LMA_ADMIN_TOKEN" not in data  # a secret: from the Secret the Deployment names
    settings = check_settings(data, tmp_path, monkeypatch)
    assert (settings.runtime, settings.device) == ("onnx", "cpu")
    assert settings.max_batch_size == int(data["LMA_MAX_BATCH_SIZE"])
    host = re.fullmatch(r"redis://([\w-]+):6379/0", settings.redis_url)
    assert host and f"Service/{host[1]}" in k8s
    # one runtime thread per requested core
    container = k8s["Deployment/lma-server"]["spec"]["template"]["spec"]["containers"][0]
    assert settings.intra_op_threads == int(container["resources"]["requests"]["cpu"])


def test_k8s_service_and_hpa_point_at_the_deployment(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment/lma-server"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    service = k8s["Service/lma-server"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]} | {PORT}
    hpa = k8s["HorizontalPodAutoscaler/lma-server"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lma-server"}
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    redis = k8s["Deployment/lma-redis"]["spec"]["template"]["metadata"]["labels"]
    assert k8s["Service/lma-redis"]["spec"]["selector"].items() <= redis.items()


def test_k8s_termination_grace_outlasts_prestop_and_drain(
    k8s: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet kills a pod when terminationGracePeriodSeconds ends: preStop, then the whole SIGTERM drain
    (uvicorn's graceful timeout, LMA_DRAIN_TIMEOUT_S + 1 s in server/cli.py) must fit inside it."""
    pod = k8s["Deployment/lma-server"]["spec"]["template"]["spec"]
    settings = check_settings(k8s["ConfigMap/lma-config"]["data"], tmp_path, monkeypatch)
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}  # the kubelet's native sleep, no process in the container
    drain_s = int(settings.drain_timeout_s) + 1
    assert pod["terminationGracePeriodSeconds"] > pre_stop["sleep"]["seconds"] + drain_s
    assert (pod["terminationGracePeriodSeconds"], pre_stop["sleep"]["seconds"], drain_s) == (45, 5, 31)


def test_compose_stop_grace_outlasts_the_drain(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = compose["services"]["server"]
    env = {k: v for k, v in server["environment"].items() if not v.startswith("${")}
    settings = check_settings(env, tmp_path, monkeypatch)
    grace = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert grace and int(grace[1]) > int(settings.drain_timeout_s) + 1


def test_k8s_disruption_budget_keeps_a_replica(k8s: dict[str, dict[str, Any]]) -> None:
    labels = k8s["Deployment/lma-server"]["spec"]["template"]["metadata"]["labels"]
    pdb = k8s["PodDisruptionBudget/lma-server"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    min_replicas = k8s["HorizontalPodAutoscaler/lma-server"]["spec"]["minReplicas"]
    assert 1 <= pdb["spec"]["maxUnavailable"] < min_replicas


def test_k8s_pod_monitor_scrapes_what_the_annotations_name(k8s: dict[str, dict[str, Any]]) -> None:
    (monitor,) = load_yaml_all(K8S / "monitoring" / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    pod = k8s["Deployment/lma-server"]["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    annotations = pod["metadata"]["annotations"]
    assert str(ports[endpoint["port"]]) == annotations["prometheus.io/port"] == str(PORT)
    assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_every_manifest(k8s: dict[str, dict[str, Any]]) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    built = {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(out.stdout) if o}
    assert set(built) == set(k8s)
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lma" for o in built.values())
