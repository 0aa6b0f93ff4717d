"""Offline checks of deploy/ (run by scripts/check-deploy, which sets up the environment).

1. `kubectl kustomize` builds both overlays.
2. Every core object validates (strict) against the Kubernetes schemas of kubernetes-validate.
3. Every InferencePool / InferenceObjective validates against its CRD's openAPIV3Schema from
   ../shared/reference/k8s/; the KEDA and Prometheus-operator objects point at what exists.
4. The EPP config uses only the field names llm-d-router v0.10 knows (the README there lists
   them), every pluginRef names a plugin, the scorers we rely on are there, and its block size
   is the server's.
5. Every metric named by the dashboard, the alerts, the ScaledObject and the EPP config (and the
   bucket bounds and labels they select) appears on a running server's /metrics.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "reference")
K8S_REF = os.path.join(SHARED, "k8s")
K8S_VERSION = "1.33.0"
OVERLAYS = ["cpu", "gpu"]
CRDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "gie-inferencepools.crd.yaml",
    ("llm-d.ai/v1alpha2", "InferenceObjective"): "llmd-inferenceobjectives.crd.yaml",
    ("llm-d.ai/v1alpha2", "InferenceModelRewrite"): "llmd-inferencemodelrewrites.crd.yaml",
}
# Field names of llm-d-router v0.10's EndpointPickerConfig (../shared/reference/k8s/README.md).
EPP_TOP = {"apiVersion", "kind", "plugins", "schedulingProfiles", "dataLayer", "featureGates",
           "flowControl", "saturationDetector"}
EPP_PLUGIN = {"name", "type", "parameters"}
EPP_PROFILE = {"name", "plugins"}
EPP_PROFILE_PLUGIN = {"pluginRef", "weight"}
EPP_EXTRACTOR = {"engineLabelKey", "defaultEngine", "engineConfigs"}
EPP_ENGINE = {"name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec",
              "cacheInfoSpec", "cacheBlockSizeLabelName", "cacheNumBlocksLabelName", "customMetrics"}
EPP_SCORERS = {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer",
               "prefix-cache-scorer"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, "deploy/k8s/overlays", overlay)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"kubectl kustomize {overlay}: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def crd_schema(filename, version):
    crd = load_yaml(os.path.join(K8S_REF, filename))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{filename} has no version {version}")


def check_objects(overlay, docs):
    kinds = {}
    for d in docs:
        api, kind, name = d.get("apiVersion", ""), d.get("kind", ""), d["metadata"]["name"]
        kinds.setdefault(kind, []).append(d)
        where = f"{overlay}: {kind}/{name}"
        if (api, kind) in CRDS:
            schema = crd_schema(CRDS[(api, kind)], api.split("/")[1])
            for e in jsonschema.Draft7Validator(schema).iter_errors(d):
                fail(f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
        elif kind in ("ScaledObject", "ServiceMonitor"):
            continue  # no CRD schema here; checked against the objects they point at below
        else:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            except Exception as e:  # noqa: BLE001 - unknown kind, bad schema: all failures
                fail(f"{where}: {e}")
    deployments = {d["metadata"]["name"]: d for d in kinds.get("Deployment", [])}
    services = {d["metadata"]["name"]: d for d in kinds.get("Service", [])}
    for so in kinds.get("ScaledObject", []):
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            fail(f"{overlay}: ScaledObject scales unknown Deployment {target}")
    for sm in kinds.get("ServiceMonitor", []):
        want = sm["spec"]["selector"]["matchLabels"]
        ports = {p["port"] for ep in sm["spec"]["endpoints"] for p in [ep]}
        matched = [s for s in services.values()
                   if want.items() <= s["metadata"].get("labels", {}).items()]
        if not matched or not any(ports <= {p.get("name") for p in s["spec"]["ports"]} for s in matched):
            fail(f"{overlay}: ServiceMonitor selects no Service with ports {ports}")
    pod_labels = deployments["caduceus"]["spec"]["template"]["metadata"]["labels"]
    if pod_labels.get("llm-d.ai/engine-type") != "caduceus":
        fail(f"{overlay}: caduceus pods lack the label llm-d.ai/engine-type: caduceus")
    for pool in kinds.get("InferencePool", []):
        if not pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items():
            fail(f"{overlay}: InferencePool selects no caduceus pod")
        epp = pool["spec"]["endpointPickerRef"]["name"]
        if epp not in services:
            fail(f"{overlay}: InferencePool's endpoint picker Service {epp} is missing")
    pools = {p["metadata"]["name"] for p in kinds.get("InferencePool", [])}
    for obj in kinds.get("InferenceObjective", []):
        if obj["spec"]["poolRef"]["name"] not in pools:
            fail(f"{overlay}: InferenceObjective {obj['metadata']['name']} names an unknown pool")
    dep = deployments["caduceus"]["spec"]["template"]["spec"]
    grace = dep["terminationGracePeriodSeconds"]
    sleep = int(dep["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    cfg = server_config()
    drain = parse_seconds(cfg["server"]["shutdown_grace_period"])
    if grace <= sleep + drain:
        fail(f"terminationGracePeriodSeconds {grace} <= preStop {sleep} s + shutdown_grace_period {drain} s")
    return len(docs)


def parse_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def server_config():
    with open(os.path.join(ROOT, "deploy/k8s/base/caduceus.toml"), "rb") as f:
        return tomllib.load(f)


def check_epp(cfg):
    for key in cfg:
        if key not in EPP_TOP:
            fail(f"EPP config: unknown top-level field {key}")
    names = set()
    for p in cfg.get("plugins", []):
        for key in p:
            if key not in EPP_PLUGIN:
                fail(f"EPP config: plugin field {key}")
        names.add(p.get("name", p["type"]))
        if p["type"] == "core-metrics-extractor":
            params = p.get("parameters", {})
            for key in params:
                if key not in EPP_EXTRACTOR:
                    fail(f"EPP config: core-metrics-extractor parameter {key}")
            for engine in params.get("engineConfigs", []):
                for key in engine:
                    if key not in EPP_ENGINE:
                        fail(f"EPP config: engineConfigs field {key}")
    types = {p["type"] for p in cfg.get("plugins", [])}
    for scorer in EPP_SCORERS - types:
        fail(f"EPP config: scorer {scorer} missing")
    refs = []
    for prof in cfg.get("schedulingProfiles", []):
        for key in prof:
            if key not in EPP_PROFILE:
                fail(f"EPP config: scheduling profile field {key}")
        for pp in prof.get("plugins", []):
            for key in pp:
                if key not in EPP_PROFILE_PLUGIN:
                    fail(f"EPP config: profile plugin field {key}")
            refs.append(pp["pluginRef"])
    for src in cfg.get("dataLayer", {}).get("sources", []):
        refs.append(src["pluginRef"])
        refs.extend(e["pluginRef"] for e in src.get("extractors", []))
    for ref in refs:
        if ref not in names:
            fail(f"EPP config: pluginRef {ref} names no plugin")
    block = server_config()["scheduler"]["block_size"]
    for p in cfg.get("plugins", []):
        if p["type"] == "precise-prefix-cache-producer":
            got = p["parameters"]["tokenProcessorConfig"]["blockSize"]
            if got != block:
                fail(f"EPP blockSize {got} != caduceus scheduler.block_size {block}")


TARGET_LABELS = {"job", "instance", "pod", "namespace"}
SPEC = re.compile(r"\b(caduceus_[a-z0-9_]+)(\{[^}]*\})?")


def referenced_metrics():
    """(source, metric, {label: value}) for every caduceus_ metric in the monitoring files."""
    refs = []
    dash = json.load(open(os.path.join(ROOT, "deploy/grafana/caduceus.json")))
    exprs = [("dashboard", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [("dashboard", v["query"]) for v in dash["templating"]["list"] if "query" in v
              and isinstance(v["query"], str)]
    for g in load_yaml(os.path.join(ROOT, "deploy/prometheus/alerts.yml"))["groups"]:
        exprs += [("alerts", r["expr"]) for r in g["rules"]]
    for d in yaml.safe_load_all(open(os.path.join(ROOT, "deploy/k8s/base/scaledobject.yaml"))):
        exprs += [("ScaledObject", t["metadata"]["query"]) for t in d["spec"]["triggers"]]
    epp = load_yaml(os.path.join(ROOT, "deploy/k8s/base/epp-config.yaml"))
    for p in epp["plugins"]:
        for engine in p.get("parameters", {}).get("engineConfigs", []):
            exprs += [("EPP config", v) for k, v in engine.items() if k.endswith("Spec")]
            labels = [engine.get("cacheBlockSizeLabelName"), engine.get("cacheNumBlocksLabelName")]
            refs.append(("EPP config", engine["cacheInfoSpec"].split("{")[0],
                         {lbl: None for lbl in labels if lbl}))
    for source, expr in exprs:
        for name, sel in SPEC.findall(expr):
            labels = {}
            for k, v in re.findall(r'(\w+)\s*=\s*"([^"]*)"', sel or ""):
                if k in TARGET_LABELS:
                    continue  # set by Prometheus at scrape time, not by the server
                labels[k] = v if k == "le" else None  # only bucket bounds must match exactly
            refs.append((source, name, labels))
    return refs, epp


def check_server_config(binary):
    """`caduceus config check` on the pod's config, its model and adapter paths (which exist only
    in the pod) pointed at a scratch file and folder."""
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        model = os.path.join(tmp, "model.gguf")
        open(model, "wb").close()
        os.mkdir(os.path.join(tmp, "adapters"))
        cfg = server_config()
        text = open(os.path.join(ROOT, "deploy/k8s/base/caduceus.toml")).read()
        text = text.replace(f'"{cfg["model"]["path"]}"', json.dumps(model))
        text = text.replace(f'"{cfg["adapters"]["dir"]}"', json.dumps(os.path.join(tmp, "adapters")))
        path = os.path.join(tmp, "caduceus.toml")
        open(path, "w").write(text)
        return subprocess.run([binary, "config", "check", path], capture_output=True, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape_running_server(binary):
    """Serves the tiny reference model with two adapters (one broken, so every adapter metric
    has a series), sends a little traffic and returns the /metrics text."""
    tiny = os.path.join(SHARED, "tiny-llama")
    tmp = tempfile.mkdtemp(prefix="check-deploy-")
    try:
        adapters = os.path.join(tmp, "adapters")
        shutil.copytree(os.path.join(tiny, "adapters/doctor-a"), os.path.join(adapters, "doctor-a"))
        shutil.copytree(os.path.join(tiny, "adapters/doctor-b"), os.path.join(adapters, "doctor-b"))
        shutil.copytree(os.path.join(tiny, "adapters/doctor-a"), os.path.join(adapters, "broken"))
        weights = os.path.join(adapters, "broken/adapter_model.safetensors")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
        port = free_port()
        env = dict(os.environ, CADUCEUS_ADAPTERS__DIR=adapters, CADUCEUS_ADAPTERS__MAX_LORAS="1",
                   CADUCEUS_KV_EVENTS__ENABLED="true",
                   CADUCEUS_KV_EVENTS__ENDPOINT=f"tcp://127.0.0.1:{free_port()}")
        log = open(os.path.join(tmp, "server.log"), "w")
        proc = subprocess.Popen([binary, "serve", "--model", os.path.join(tiny, "model"),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                if proc.poll() is not None:
                    break
                try:
                    if http(base + "/health")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError("the server did not become healthy")
            if proc.poll() is not None:
                raise RuntimeError("the server exited: " + open(log.name).read()[-2000:])
            for model in ["model", "doctor-a", "doctor-b", "doctor-a", "broken"]:
                http(base + "/v1/completions", {"model": model, "prompt": "Hello there, doctor",
                                                "max_tokens": 4, "ignore_eos": True})
            return http(base + "/metrics")[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_metrics(page, refs):
    samples = []
    for line in page.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            samples.append((m.group(1), labels))
    names = {n for n, _ in samples}
    checked = set()
    for source, name, labels in refs:
        if name not in names:
            fail(f"{source} names {name}, which the server does not expose")
            continue
        for k, v in labels.items():
            if not any(n == name and k in lb and (v is None or lb[k] == v) for n, lb in samples):
                want = f'{k}="{v}"' if v is not None else k
                fail(f"{source}: {name} has no series with {want}")
        checked.add(name)
    return len(checked)


def main():
    binary = os.environ.get("CADUCEUS") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "caduceus")
    if not os.path.isdir(K8S_REF):
        fail(f"reference material missing: {K8S_REF}")
        return 1
    for overlay in OVERLAYS:
        n = check_objects(overlay, kustomize(overlay))
        print(f"overlay {overlay}: {n} objects checked")
    epp = load_yaml(os.path.join(ROOT, "deploy/k8s/base/epp-config.yaml"))
    check_epp(epp)
    out = check_server_config(binary) if os.path.exists(binary) else None
    if out is None:
        fail(f"no caduceus binary at {binary} (cargo build --bin caduceus, or set CADUCEUS)")
    elif out.returncode != 0:
        fail(f"deploy/k8s/base/caduceus.toml: {(out.stderr or out.stdout).strip()}")
    refs, _ = referenced_metrics()
    if out is not None:
        page = scrape_running_server(binary)
        n = check_metrics(page, refs)
        print(f"metrics: {n} names referenced by dashboard/alerts/ScaledObject/EPP config found on /metrics")
    if failures:
        print(f"check-deploy: {len(failures)} problem(s)")
        return 1
    print("check-deploy: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
