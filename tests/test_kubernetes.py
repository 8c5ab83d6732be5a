"""deploy/kubernetes: every overlay renders (`kubectl kustomize`), every object is valid against the
Kubernetes schemas offline (`kubernetes-validate`), the objects say what the README promises, and the
pod's own command lines (serve, the probes, the bridge) are ones the CLIs accept and that work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.32.0"  # the oldest minor still maintained upstream when this was written
# Custom resources: their operators' CRDs are not in the Kubernetes schemas (checked by hand below).
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor")}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render the overlays (CI has it)")
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(objects: list[dict], kind: str, name: str) -> dict:
    return one(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def test_the_overlays_are_gpu_cpu_and_keda():
    assert OVERLAYS == ["cpu", "gpu", "keda"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(rendered, overlay):
    import kubernetes_validate

    custom = []
    for obj in rendered[overlay]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM:
            custom.append(obj["kind"])
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any error
    assert set(custom) <= {kind for _, kind in CUSTOM}


def test_a_gpu_daemon_pod_holds_one_gpu_and_a_cpu_pod_none(rendered):
    gpu = container(rendered["gpu"], "StatefulSet", "qwen3vl-daemon")["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    cpu = container(rendered["cpu"], "StatefulSet", "qwen3vl-daemon")["resources"]
    assert "nvidia.com/gpu" not in {**cpu.get("limits", {}), **cpu.get("requests", {})}
    config = {o: one(rendered[o], "ConfigMap", next(c["metadata"]["name"] for c in find(rendered[o], "ConfigMap")))
              for o in ("gpu", "cpu")}
    assert config["gpu"]["data"]["QWEN3VL_DEVICE"] == "cuda" and config["cpu"]["data"]["QWEN3VL_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_non_root_read_only_with_no_capabilities(rendered, overlay):
    for kind, name in (("StatefulSet", "qwen3vl-daemon"), ("Deployment", "qwen3vl-bridge")):
        pod = one(rendered[overlay], kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            security = c["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "limits" in c["resources"] and "requests" in c["resources"]


def daemon_env(objects: list[dict]) -> dict[str, str]:
    """The daemon container's environment: its ConfigMap, then its own env entries."""
    c = container(objects, "StatefulSet", "qwen3vl-daemon")
    config = one(objects, "ConfigMap", c["envFrom"][0]["configMapRef"]["name"])["data"]
    return {**config, **{e["name"]: e["value"] for e in c["env"]}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_daemon_keeps_its_models_on_a_volume_run_on_an_emptydir_and_its_keys_in_a_secret(rendered, overlay):
    objects = rendered[overlay]
    sts = one(objects, "StatefulSet", "qwen3vl-daemon")
    pod, c, env = sts["spec"]["template"]["spec"], container(objects, "StatefulSet", "qwen3vl-daemon"), daemon_env(objects)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/run"]] and "emptyDir" in volumes[mounts["/tmp"]]
    cache = mounts["/var/cache/qwen3vl"]
    assert cache in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert env["HF_HOME"].startswith("/var/cache/qwen3vl/") and env["QWEN3VL_FINGERPRINT_CACHE"].startswith("/var/cache/qwen3vl/")
    secret_dirs = {path for path, name in mounts.items() if "secret" in volumes.get(name, {})}
    for key in ("QWEN3VL_CURVE_SECRET_KEY", "QWEN3VL_CURVE_SERVER_KEY", "QWEN3VL_CURVE_CLIENT_KEY"):
        assert str(Path(env[key]).parent) in secret_dirs, key
    assert env["QWEN3VL_CURVE_AUTHORIZED_KEYS"] in secret_dirs
    assert c["args"][:3] == ["serve", "--endpoint", "tcp://0.0.0.0:5555"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_the_drain(rendered, overlay):
    pod = one(rendered[overlay], "StatefulSet", "qwen3vl-daemon")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(daemon_env(rendered[overlay])["QWEN3VL_DRAIN_TIMEOUT"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_probes_fit_a_model_server(rendered, overlay):
    c = container(rendered[overlay], "StatefulSet", "qwen3vl-daemon")
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # a first download and load
    assert "--ready" in startup["exec"]["command"] and "--ready" in ready["exec"]["command"]
    assert "--live" in live["exec"]["command"]
    for probe in (startup, ready, live):
        assert probe["timeoutSeconds"] >= 2  # the CLI's start plus its own one second
    bridge = container(rendered[overlay], "Deployment", "qwen3vl-bridge")
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_daemons_have_a_headless_service_and_the_bridge_finds_them_by_dns(rendered, overlay):
    objects = rendered[overlay]
    headless = one(objects, "Service", "qwen3vl-daemon")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert headless["spec"]["selector"].items() <= \
        one(objects, "StatefulSet", "qwen3vl-daemon")["spec"]["template"]["metadata"]["labels"].items()
    zmq_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "zmq")
    bridge = container(objects, "Deployment", "qwen3vl-bridge")
    endpoint = bridge["args"][bridge["args"].index("--endpoint") + 1]
    assert endpoint == f"dns+tcp://qwen3vl-daemon:{zmq_port}"
    assert one(objects, "Service", "qwen3vl-bridge")["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_network_policies_select_the_pods_they_guard(rendered, overlay):
    objects = rendered[overlay]
    pods = {name: one(objects, kind, name)["spec"]["template"]
            for kind, name in (("StatefulSet", "qwen3vl-daemon"), ("Deployment", "qwen3vl-bridge"))}
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        guarded = set()
        for obj in find(objects, kind):
            selector = (obj["spec"].get("selector") or obj["spec"]["podSelector"])["matchLabels"]
            guarded |= {name for name, t in pods.items() if selector.items() <= t["metadata"]["labels"].items()}
        assert guarded == set(pods), kind
    for policy in find(objects, "NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        target = next(t for t in pods.values()
                      if policy["spec"]["podSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items())
        ports = {p["containerPort"] for c in target["spec"]["containers"] for p in c["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= ports  # only ports the pod serves
            assert rule["from"], "a rule must name who may connect"
        app = {"app.kubernetes.io/part-of": "qwen3vl"}
        assert any(f.get("podSelector", {}).get("matchLabels") == app and "namespaceSelector" not in f
                   for rule in policy["spec"]["ingress"] for f in rule["from"])


def test_the_hpa_scales_the_daemons_on_the_queue_depth_they_export(rendered):
    from qwen3vl_client.prometheus import DaemonSnapshot
    from qwen3vl_client.protocol import MetricsReply

    for overlay in ("gpu", "cpu"):
        hpa = one(rendered[overlay], "HorizontalPodAutoscaler", "qwen3vl-daemon")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "qwen3vl-daemon"}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
    snapshot = MetricsReply({}, {}, {}, {}, {}, {}, 0.0, 0.0, 3, 10, 1.0, status="ready")
    exported = {family.name: family for family in DaemonSnapshot(snapshot).collect()}
    assert exported[name].samples[0].value == 3
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())
    assert name in {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert not one(rendered["gpu"], "StatefulSet", "qwen3vl-daemon")["spec"].get("replicas")  # the HPA owns it


def test_the_keda_overlay_replaces_the_hpa_with_a_scaled_object_on_the_same_metric(rendered):
    objects = rendered["keda"]
    assert not find(objects, "HorizontalPodAutoscaler")
    scaled = one(objects, "ScaledObject", "qwen3vl-daemon")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "qwen3vl-daemon"}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "qwen3vl_daemon_queue_depth" in trigger["metadata"]["query"]
    assert f'namespace="{one(objects, "StatefulSet", "qwen3vl-daemon")["metadata"]["namespace"]}"' in \
        trigger["metadata"]["query"]
    monitor = one(objects, "PodMonitor", "qwen3vl")
    ports = {p["name"] for kind, name in (("StatefulSet", "qwen3vl-daemon"), ("Deployment", "qwen3vl-bridge"))
             for p in container(objects, kind, name)["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


# -- the pod's command lines, run for real --------------------------------------------------------------
def local(value: str, paths: dict[str, Path]) -> str:
    for pod_path, here in paths.items():
        value = value.replace(pod_path, str(here))
    return value


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """The Secret qwen3vl-curve as the README makes it: a server and a client key pair."""
    keys = tmp_path_factory.mktemp("curve")
    for name in ("server", "client"):
        subprocess.run([sys.executable, "-m", "daemon", "keygen", str(keys), "--name", name], check=True,
                       capture_output=True, timeout=60)
    return keys


def test_the_pod_starts_the_daemon_and_its_probes_pass_once_ready(rendered, keys, tmp_path, tiny_dir):
    objects = rendered["cpu"]
    c = container(objects, "StatefulSet", "qwen3vl-daemon")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((keys / "client.key").read_bytes())
    port, metrics_port = free_port(), free_port()
    paths = {"/etc/qwen3vl/curve": keys, "/etc/qwen3vl/authorized": authorized, "/var/cache/qwen3vl": tmp_path,
             ":5555": f":{port}", ":9464": f":{metrics_port}"}
    env = {k: local(v, paths) for k, v in daemon_env(objects).items()}
    env.update(QWEN3VL_EMBEDDING_MODEL=str(tiny_dir), QWEN3VL_RERANKER_MODEL="none", HF_HUB_OFFLINE="1")
    full_env = {**os.environ, **env}
    log, errors = tmp_path / "stdout.log", tmp_path / "stderr.log"
    args = [local(a, paths) for a in c["args"]]
    process = subprocess.Popen([sys.executable, "-m", "daemon", *args], env=full_env, stdout=log.open("wb"),
                               stderr=errors.open("wb"))
    try:
        def run(probe: dict) -> subprocess.CompletedProcess:
            command = [local(a, paths) for a in probe["exec"]["command"]]
            assert command[0] == "qwen3vl-daemon"
            return subprocess.run([sys.executable, "-m", "daemon", *command[1:]], env=full_env, capture_output=True,
                                  text=True, timeout=probe["timeoutSeconds"] + 10)

        deadline = time.monotonic() + 120
        while run(c["startupProbe"]).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text() + errors.read_text()
            time.sleep(0.5)
        for probe in ("readinessProbe", "livenessProbe"):
            result = run(c[probe])
            assert result.returncode == 0, (probe, result.stdout, result.stderr)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert "qwen3vl_daemon_ready 1.0" in response.read().decode()
        process.terminate()  # SIGTERM, as the kubelet sends it
        assert process.wait(60) == 0
        # QWEN3VL_LOG_STREAM=stdout: the log lines are on stdout, where the container runtime collects them.
        assert "listening on" in log.read_text() and "draining" in log.read_text()
        assert "listening on" not in errors.read_text()
    finally:
        process.kill()


def test_the_bridge_command_line_is_one_the_bridge_accepts(rendered, keys, tmp_path):
    from http_bridge.cli import main as bridge_cli

    c = container(rendered["gpu"], "Deployment", "qwen3vl-bridge")
    token = tmp_path / "bridge"
    token.mkdir()
    (token / "token").write_text("secret-token")
    paths = {"/etc/qwen3vl/curve": keys, "/etc/qwen3vl/bridge": token}
    assert c["command"] == ["qwen3vl-bridge"]
    env = {e["name"]: local(e["value"], paths) for e in c["env"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = bridge_cli.make_context("qwen3vl-bridge", [local(a, paths) for a in c["args"]])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert ctx.params["endpoint"].startswith("dns+tcp://") and ctx.params["curve_client_key"].endswith("key_secret")
