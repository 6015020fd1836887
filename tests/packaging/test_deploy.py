"""deploy/: the Kubernetes manifests and the Cloudflare Containers example parse,
validate, and agree with the image and the server's settings.

- Every YAML and JSON(C) file parses; the Kubernetes objects validate (strictly:
  no unknown field) against the schemas of Kubernetes 1.29 and of the newest
  release kubernetes-validate knows, KEDA's ScaledObject against the schema
  vendored in tests/packaging/schemas/ (its README says from which package).
- The Deployment: probes on /api/health at the image's port, a grace period above
  gunicorn's graceful_timeout for the same environment, non-root as the image's
  uid, read-only root with /tmp (the image's TMPDIR) writable, CPU requests =
  limits and bb's thread count tied to the limit, its metrics scraped; the Service,
  ScaledObject and PDB select it consistently.
- The ScaledObject scales on the gauge bbworker.server.metrics exports for it
  (bb_worker_proof_requests), summed over this Deployment's pods, with a target
  between "every slot busy" and "a pod full" for the Deployment's settings.
- The Worker: forwards /api/* with the Rust setup's timeouts (120 s for proofs,
  30 s otherwise), which cover the container's queue + prove deadlines; it talks
  to the image's port, and its wrangler config builds this repo's Dockerfile.
"""
import glob
import json
import os
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bbworker.server import metrics

from support import (CLOUDFLARE, DEPLOY, IMAGE_UID, K8S, ROOT, deployment_env, k8s_objects,
                     load_dockerfile as load, read_text as read, runtime_config, settings_for)

K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SCHEMAS = os.path.join(ROOT, "tests", "packaging", "schemas")
# Custom resources: (apiVersion, kind) -> the vendored JSON schema of the CRD (tests/packaging/schemas/README.md).
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json"}


def strip_jsonc(text):
    """JSON with // and /* */ comments and trailing commas (wrangler.jsonc) -> JSON text."""
    out, i, quoted = [], 0, False
    while i < len(text):
        ch = text[i]
        if quoted:
            out.append(ch)
            if ch == "\\":
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            out.append(ch)
        elif text.startswith("//", i):
            i = text.find("\n", i) - 1 if "\n" in text[i:] else len(text)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 1
        else:
            out.append(ch)
        i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(DEPLOY, "**", "*.y*ml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, DEPLOY))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(read(path)) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(DEPLOY, "**", "*.json*"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, DEPLOY))
def test_json_parses(path):
    text = read(path)
    assert isinstance(json.loads(strip_jsonc(text) if path.endswith(".jsonc") else text), dict)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version):
    for kind, obj in k8s_objects().items():
        if (obj["apiVersion"], kind) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind} does not validate against Kubernetes {version}: {exc}") from None


def strict(schema):
    """`schema` with additionalProperties false wherever an object lists its properties and says
    nothing of others (what kubernetes-validate's strict schemas do): a misspelt field fails."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(value) for value in schema]
    return schema


def custom_validator(api_version, kind):
    with open(os.path.join(SCHEMAS, CUSTOM_KINDS[(api_version, kind)])) as f:
        schema = strict(json.load(f))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_custom_resources_validate_against_their_vendored_schemas():
    custom = [obj for kind, obj in k8s_objects().items() if (obj["apiVersion"], kind) in CUSTOM_KINDS]
    assert [obj["kind"] for obj in custom] == ["ScaledObject"]
    for obj in custom:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in custom_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj)]
        assert errors == [], f"{obj['kind']} does not validate against its CRD's schema: {errors}"


@pytest.mark.parametrize("mistake", [
    ("spec", "maxReplicas", 10),  # the HPA's name, not KEDA's maxReplicaCount
    ("spec", "triggers", [{"type": "prometheus", "metadata": {"threshold": 3}}]),  # KEDA's metadata are strings
    ("spec", "fallback", {"replicas": 4}),  # failureThreshold is required
])
def test_the_vendored_schema_catches_mistakes(mistake):
    """The check above can fail: the schema, made strict, refuses what KEDA's API server would."""
    obj = json.loads(json.dumps(k8s_objects()["ScaledObject"]))
    section, field, value = mistake
    obj[section][field] = value
    assert list(custom_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj)), mistake


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load(read(os.path.join(K8S, "kustomization.yaml")))["resources"])
    present = {os.path.basename(p) for p in glob.glob(os.path.join(K8S, "*.yaml"))} - {"kustomization.yaml"}
    assert listed == present


# ---------------------------------------------------------------- Kubernetes

def _pod():
    return k8s_objects()["Deployment"]["spec"]["template"]["spec"]


def _container():
    containers = _pod()["containers"]
    assert len(containers) == 1
    return containers[0]


def _env():
    return deployment_env()


def test_probes_hit_readiness_and_liveness_on_the_image_port():
    _, _, image_env = runtime_config(load())
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(image_env["PORT"])}
    assert load().runtime.one("EXPOSE").args == str(ports["http"])
    paths = {"readinessProbe": "/api/health", "livenessProbe": "/api/live", "startupProbe": "/api/live"}
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 8080, probe
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, "liveness must tolerate a busy minute"


def test_grace_period_covers_a_queued_and_running_proof(tmp_path):
    env = {k: v for k, v in _env().items() if v is not None}
    computed = settings_for(env, tmp_path)
    assert computed["graceful_timeout"] >= computed["queue_timeout_seconds"] + computed["prove_timeout_seconds"]
    grace = _pod()["terminationGracePeriodSeconds"]
    assert grace > computed["graceful_timeout"], f"grace {grace} s <= gunicorn graceful_timeout"
    assert grace >= computed["prove_timeout_seconds"]


def test_pod_runs_as_the_image_user_with_a_read_only_root():
    pod, container = _pod(), _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID == int(load().runtime.one("USER").args.split(":")[0])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    _, _, image_env = runtime_config(load())
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[image_env["TMPDIR"]]], "TMPDIR must be a writable volume"
    for name in ("BB_CRS_PATH", "VK_CACHE_DIR", "BB_BINARY", "CIRCUIT_PATH"):
        assert name not in _env(), f"{name} is the image's: the VK and CRS are baked in under /app"


def test_cpu_requests_match_limits_and_bb_threads_follow_them():
    resources = _container()["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    env = {e["name"]: e for e in _container()["env"]}
    field = env["HARDWARE_CONCURRENCY"]["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1"
    # The scheduler splits the CPU limit between the proofs it runs at once: never more bb than cores.
    assert 1 <= int(_env()["MAX_CONCURRENT_PROOFS"]) <= int(resources["limits"]["cpu"])

    def mib(quantity):
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
        return int(number) * (1024 if unit == "Gi" else 1)
    # server ~65 MiB + one 2^15-row proof ~100 MiB; under load MAX_CONCURRENT_PROOFS of them, which the
    # scheduler keeps within PROOF_MEMORY_BUDGET_BYTES, by default half the memory limit
    assert mib(resources["requests"]["memory"]) >= 160
    assert mib(resources["limits"]["memory"]) // 2 >= int(_env()["MAX_CONCURRENT_PROOFS"]) * 100
    assert mib(resources["limits"]["memory"]) >= mib(resources["requests"]["memory"])


def test_service_autoscaler_and_pdb_point_at_the_deployment():
    objects = k8s_objects()
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8080)
    assert "HorizontalPodAutoscaler" not in objects, "KEDA makes the HPA; a second one would fight it"
    scaler = objects["ScaledObject"]["spec"]
    assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": deployment["metadata"]["name"]}
    assert 2 <= scaler["minReplicaCount"] <= scaler["maxReplicaCount"]
    assert scaler["minReplicaCount"] <= deployment["spec"]["replicas"] <= scaler["maxReplicaCount"]
    assert scaler["minReplicaCount"] <= scaler["fallback"]["replicas"] <= scaler["maxReplicaCount"]
    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < scaler["minReplicaCount"], "a drain must be able to proceed"


# ---------------------------------------------------------------- autoscaling on the proof queue

def _trigger():
    [trigger] = k8s_objects()["ScaledObject"]["spec"]["triggers"]
    return trigger


def _selector(query):
    """(metric name, {label: (operator, value)}) of the one selector in a PromQL `sum(...)` query."""
    m = re.fullmatch(r"sum\((\w+)\{(.*)\}\)", query)
    assert m, f"the query is not sum(<metric>{{<labels>}}): {query}"
    labels = {}
    for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2)):
        labels[name] = (op, value)
    return m.group(1), labels


def test_pods_are_scraped_for_their_metrics():
    _, _, image_env = runtime_config(load())
    annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == image_env["PORT"] == str(_container()["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/api/metrics"
    assert "API_TOKENS" not in _env() and "API_TOKENS_FILE" not in _env(), \
        "with tokens, /api/metrics needs one: give Prometheus's scrape job the token (deploy/README.md)"


def test_the_autoscaler_sums_the_proof_requests_gauge_of_this_deployments_pods():
    trigger = _trigger()
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"  # per pod
    metric, labels = _selector(trigger["metadata"]["query"])
    [family] = metrics.PROOF_REQUESTS.describe()  # summed over a pod's workers: tests/live/test_scaling.py
    assert metric == family.name == "bb_worker_proof_requests" and family.type == "gauge"
    namespace = yaml.safe_load(read(os.path.join(K8S, "kustomization.yaml"))).get("namespace", "default")
    assert labels["namespace"] == ("=", namespace)
    op, pattern = labels["pod"]
    name = k8s_objects()["Deployment"]["metadata"]["name"]
    assert op == "=~"
    assert re.fullmatch(pattern, f"{name}-5d9c7b8f6d-x2x7q"), "a pod of the Deployment (<name>-<hash>-<id>)"
    for other in (name, f"{name}-canary-5d9c7b8f6d-x2x7q", f"other-{name}-5d9c7b8f6d-x2x7q"):
        assert not re.fullmatch(pattern, other), other
    assert trigger["metadata"]["ignoreNullValues"] == "false", "no samples must not read as no requests"


def test_the_target_per_pod_is_past_busy_and_short_of_full(tmp_path):
    """threshold, the proof requests per pod KEDA aims at: above the proofs a pod runs at once
    (every slot busy is not behind), at most twice that (a request waits about one proof's
    time at the target), and below the requests a pod holds before it answers 503."""
    settings = settings_for({k: v for k, v in _env().items() if v is not None}, tmp_path)
    threshold = float(_trigger()["metadata"]["threshold"])
    slots = settings["max_concurrent_proofs"]
    assert slots < threshold <= 2 * slots
    assert threshold < slots + settings["max_queued_requests"] * settings["web_concurrency"]


# ---------------------------------------------------------------- Cloudflare

def _worker_source():
    return read(os.path.join(CLOUDFLARE, "src", "index.ts"))


def _ts_const(name):
    """Value of a `const NAME = <arithmetic on numbers and other such consts>;` in src/index.ts."""
    m = re.search(rf"^const {name} = ([^;]+);", _worker_source(), re.M)
    assert m, f"const {name} not found in src/index.ts"
    expression = re.sub(r"(?<=\d)_(?=\d)", "", m.group(1))  # 120_000 -> 120000
    assert re.fullmatch(r"[\w\s()+*]+", expression), expression
    names = {k: _ts_const(k) for k in re.findall(r"\b[A-Z][A-Z_]+\b", expression)}
    return eval(expression, {"__builtins__": {}}, names)


def test_worker_timeouts_match_the_rust_setup_and_cover_the_container(tmp_path):
    defaults = settings_for({"PROOF_CORES": "2"}, tmp_path)  # standard-3: 2 vCPU
    assert _ts_const("PROVE_TIMEOUT_SECONDS") == defaults["prove_timeout_seconds"] == 90
    assert _ts_const("QUEUE_TIMEOUT_SECONDS") == defaults["queue_timeout_seconds"]
    assert _ts_const("MAX_CONCURRENT_PROOFS") == defaults["max_concurrent_proofs"]
    prove_ms = _ts_const("PROVE_ROUTE_TIMEOUT_MS")
    assert prove_ms == 120_000, "the Rust setup's prove timeout"
    assert prove_ms >= 1000 * (defaults["queue_timeout_seconds"] + defaults["prove_timeout_seconds"])
    assert _ts_const("OTHER_ROUTE_TIMEOUT_MS") == 30_000
    source = _worker_source()
    for name in ("PROVE_TIMEOUT_SECONDS", "QUEUE_TIMEOUT_SECONDS", "MAX_CONCURRENT_PROOFS"):
        assert re.search(rf"{name}: String\({name}\)", source), f"{name} is not passed to the container"


def test_worker_forwards_api_routes_to_the_image_port():
    source = _worker_source()
    assert '.basePath("/api")' in source and 'app.all("/*"' in source
    assert re.search(r'path === "/api/prove" \|\| path.startsWith\("/api/prove/"\)', source)
    _, _, image_env = runtime_config(load())
    assert re.search(rf"defaultPort = {image_env['PORT']};", source)
    assert 'pingEndpoint = "localhost/api/health"' in source
    assert "enableInternet = false" in source  # the image carries its CRS: no downloads at run time


def test_wrangler_builds_this_repo_image_for_the_worker_class(tmp_path):
    config = json.loads(strip_jsonc(read(os.path.join(CLOUDFLARE, "wrangler.jsonc"))))
    assert os.path.exists(os.path.join(CLOUDFLARE, config["main"]))
    [container] = config["containers"]
    assert os.path.samefile(os.path.join(CLOUDFLARE, container["image"]), os.path.join(ROOT, "Dockerfile"))
    assert os.path.samefile(os.path.join(CLOUDFLARE, container["image_build_context"]), ROOT)
    class_name = container["class_name"]
    assert re.search(rf"export class {class_name} extends Container", _worker_source())
    [binding] = config["durable_objects"]["bindings"]
    assert binding["class_name"] == class_name
    assert re.search(rf"{binding['name']}: DurableObjectNamespace<{class_name}>", _worker_source())
    assert class_name in config["migrations"][0]["new_sqlite_classes"]
    assert _ts_const("CONTAINER_INSTANCES") <= container["max_instances"]


def test_worker_dependencies_are_pinned():
    package = json.loads(read(os.path.join(CLOUDFLARE, "package.json")))
    deps = {**package["dependencies"], **package["devDependencies"]}
    assert {"@cloudflare/containers", "hono", "wrangler", "typescript"} <= set(deps)
    for name, version in deps.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}@{version} is not an exact version"


def test_readme_explains_sizing_and_crs():
    text = read(os.path.join(DEPLOY, "README.md"))
    for words in ("MAX_CONCURRENT_PROOFS", "terminationGracePeriodSeconds", "HARDWARE_CONCURRENCY",
                  "2^k + 1", "readOnlyRootFilesystem", "wrangler deploy", "CRS_POINTS", "ScaledObject",
                  "bb_worker_proof_requests", "prometheus-adapter", "docs/scaling.md"):
        assert words in text, f"deploy/README.md does not mention {words}"
