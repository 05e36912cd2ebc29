#!/usr/bin/env bash
# Validates everything under deploy/ and docker-compose.yml offline:
# - Prometheus: `promtool check rules`, `promtool test rules`, `promtool check config`
# - Kubernetes: the kustomizations (base, keda, hpa) built with `kubectl
#   kustomize` (or `kustomize build`) and validated against the Kubernetes
#   schemas with kubernetes-validate --strict (KEDA's CRD has no schema there:
#   its required fields are checked below)
# - docker-compose.yml parsed and checked for its services, files and ports
# - every fleet_* metric that a rule, dashboard or autoscaler uses is one
#   the code exports; the Grafana dashboard equals its generator's output;
#   the Dockerfile is multi-stage and runs as a non-root user
# Tools come from scripts/install-deps.sh. Prints "N passed, 0 failed".
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
check() {
    local name="$1"; shift
    local out
    if out="$("$@" 2>&1)"; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        echo "$out" | sed 's/^/     /'
    fi
}

# --- Prometheus
check "promtool check rules" promtool check rules deploy/prometheus/rules/fleet.rules.yml
check "promtool test rules" promtool test rules deploy/prometheus/tests/fleet.rules.test.yml
check "promtool check config (compose)" promtool check config --syntax-only deploy/prometheus/prometheus.yml
# Debian's promtool is built without Kubernetes service discovery, so the
# Kubernetes scrape config is only parsed.
check "prometheus-kubernetes.yml parses" python3 -c '
import sys, yaml
c = yaml.safe_load(open("deploy/prometheus/prometheus-kubernetes.yml"))
assert c["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"
'

# --- Kubernetes
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
build() {
    if command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$1"
    elif command -v kustomize >/dev/null 2>&1; then
        kustomize build "$1"
    else
        echo "neither kubectl nor kustomize is installed" >&2
        return 1
    fi
}
for k in base keda hpa; do
    check "kustomize build deploy/k8s/$k" sh -c "$(declare -f build); build deploy/k8s/$k > $WORK/$k.yaml"
    check "kubernetes-validate --strict deploy/k8s/$k" kubernetes-validate --strict --quiet "$WORK/$k.yaml"
done
check "alternative ScaledObject validates" kubernetes-validate --strict --quiet deploy/k8s/keda/scaledobject-nats-jetstream.yaml
check "manifests: probes, grace period, PDBs, auth on, KEDA fields" python3 - "$WORK" <<'PY'
import re, sys, yaml, tomllib
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{work}/base.yaml")) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
cm = by[("ConfigMap", "retro-fleet-config")]["data"]["retro-fleet.toml"]
drain_s = tomllib.loads(cm).get("worker", {}).get("drain_timeout_ms", 30000) / 1000
for role in ["ingress", "worker", "scaler"]:
    dep = by[("Deployment", f"retro-fleet-{role}")]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live", role
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready", role
    assert "requests" in c["resources"] and "limits" in c["resources"], role
    assert spec["securityContext"]["runAsNonRoot"] is True, role
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true", role
assert tomllib.loads(cm)["ingress"]["auth"]["enabled"] is True, "authentication is on in deployments"
ing = by[("Deployment", "retro-fleet-ingress")]["spec"]["template"]["spec"]["containers"][0]
keys = next(e for e in ing["env"] if e["name"] == "FLEET_INGRESS__AUTH__API_KEYS")
assert keys["valueFrom"]["secretKeyRef"]["name"] == "retro-fleet-auth", "API keys come from a Secret"
worker = by[("Deployment", "retro-fleet-worker")]["spec"]["template"]["spec"]
assert worker["terminationGracePeriodSeconds"] > drain_s, "grace period must exceed the worker drain"
for pdb in ["retro-fleet-ingress", "retro-fleet-worker"]:
    assert ("PodDisruptionBudget", pdb) in by, pdb
nats = by[("StatefulSet", "nats")]["spec"]
assert nats["volumeClaimTemplates"]
assert nats["replicas"] == 3, "NATS runs as a 3-node cluster"
assert nats["template"]["spec"]["affinity"]["podAntiAffinity"], "one NATS pod per node"
conf = by[("ConfigMap", "nats-config")]["data"]["nats.conf"]
for i in range(3):
    assert f"nats://nats-{i}.nats-headless:6222" in conf, f"route to nats-{i}"
assert by[("Service", "nats-headless")]["spec"]["publishNotReadyAddresses"] is True
assert ("PodDisruptionBudget", "nats") in by
assert tomllib.loads(cm)["topology"]["replicas"] == 3, "streams and buckets on all three NATS nodes"
keda = [d for d in yaml.safe_load_all(open(f"{work}/keda.yaml")) if d]
so = next(d for d in keda if d["kind"] == "ScaledObject")
assert so["apiVersion"] == "keda.sh/v1alpha1"
assert so["spec"]["scaleTargetRef"]["name"] == "retro-fleet-worker"
trig = so["spec"]["triggers"][0]
assert trig["type"] == "prometheus" and "fleet_recommended_replicas" in trig["metadata"]["query"]
for key in ["serverAddress", "threshold"]:
    assert trig["metadata"][key], key
wk = next(d for d in keda if d["kind"] == "Deployment" and d["metadata"]["name"] == "retro-fleet-worker")
assert "replicas" not in wk["spec"], "KEDA owns the worker replica count"
alt = yaml.safe_load(open("deploy/k8s/keda/scaledobject-nats-jetstream.yaml"))
streams = {t["metadata"]["stream"] for t in alt["spec"]["triggers"] if t["type"] == "nats-jetstream"}
assert streams == {"FLEET_REQ_HIGH", "FLEET_REQ_NORMAL", "FLEET_REQ_LOW"}, streams
PY

# --- docker-compose
check "docker-compose.yml: services, files, ports" python3 - <<'PY'
import os, yaml
c = yaml.safe_load(open("docker-compose.yml"))
s = c["services"]
for name in ["nats", "ingress", "worker", "scaler", "prometheus"]:
    assert name in s, f"service {name} missing"
for name, svc in s.items():
    b = svc.get("build")
    if b:
        assert os.path.isfile(os.path.join(b["context"], b["dockerfile"])), f"{name}: no {b['dockerfile']}"
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("./"):
            assert os.path.exists(src), f"{name}: volume source {src} missing"
    for dep in svc.get("depends_on", []):
        assert dep in s, f"{name} depends on unknown {dep}"
assert "scaler" in s["scaler"]["command"]
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
jobs = {j["job_name"] for j in prom["scrape_configs"]}
assert {"retro-fleet-ingress", "retro-fleet-worker", "retro-fleet-scaler"} <= jobs, jobs
PY
if docker compose version >/dev/null 2>&1; then
    check "docker compose config" docker compose config -q
fi

# --- cross-checks
check "deploy/ uses only metrics the code exports" python3 - <<'PY'
import pathlib, re
code = ""
for root in ["src", "workers/src"]:
    for p in pathlib.Path(root).rglob("*.rs"):
        code += p.read_text()
exported = set(re.findall(r'"(fleet_[a-z0-9_]+)"', code))
used = {}
for p in list(pathlib.Path("deploy").rglob("*")) + [pathlib.Path("docker-compose.yml")]:
    if p.is_file() and p.suffix in {".yml", ".yaml", ".json"}:
        for m in re.findall(r"\bfleet_[a-z0-9_]+", p.read_text()):
            used.setdefault(re.sub(r"_(bucket|sum|count)$", "", m), set()).add(str(p))
known_other = {"fleet_workers", "fleet_models", "fleet_ratelimit", "fleet_batches"}  # KV buckets
missing = {m: sorted(f) for m, f in used.items() if m not in exported and m not in known_other}
assert not missing, f"metrics used in deploy/ but not exported: {missing}"
assert "fleet_recommended_replicas" in exported
PY
check "Grafana dashboard matches scripts/gen-dashboard.py" python3 scripts/gen-dashboard.py --check
check "Dockerfile: multi-stage, non-root" python3 - <<'PY'
import re
d = open("deploy/Dockerfile").read()
froms = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", d, re.M | re.I)
assert len(froms) >= 2 and froms[0], "multi-stage with a named build stage"
users = re.findall(r"^USER\s+(\S+)", d, re.M)
assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
assert "COPY --from=" in d
PY

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
