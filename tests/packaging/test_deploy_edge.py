"""deploy/: what stands between the internet and the workers.

- The Kubernetes Ingress (ingress-nginx): its read and send timeouts exceed gunicorn's
  graceful_timeout for the Deployment's environment, its body limit exceeds
  MAX_BODY_BYTES, a 503 is retried on another pod, it routes the public endpoints to
  the Service and never /api/metrics.
- The Cloudflare Worker: its TypeScript type-checks (`tsc --noEmit` with the packages
  pinned in package-lock.json, installed by `npm ci`); its forwarding retries a 503 on
  other instances with the same request (tests/packaging/forward.test.mjs, run by
  Node against the compiled src/forward.ts); it forwards /api/verify and keeps
  /api/metrics private.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from support import CLOUDFLARE, ROOT, deployment_env, k8s_objects, read_text as read, settings_for

# ---------------------------------------------------------------- Kubernetes Ingress

PUBLIC = ["/api/prove", "/api/prove/my_circuit", "/api/verify", "/api/verify/my_circuit", "/api/vk",
          "/api/vk/my_circuit", "/api/health", "/api/live", "/api/openapi.json"]
PRIVATE = ["/api/metrics", "/api/metrics/", "/metrics", "/api", "/api/prover", "/"]


def _ingress():
    return k8s_objects()["Ingress"]


def _annotation(name):
    return _ingress()["metadata"]["annotations"][f"nginx.ingress.kubernetes.io/{name}"]


def _routes(path):
    """Backends of the Ingress rules that match `path` (Kubernetes Prefix/Exact semantics)."""
    found = []
    for rule in _ingress()["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            want = entry["path"]
            if entry["pathType"] == "Exact":
                hit = path == want
            else:  # Prefix: element-wise, "/api/prove" matches /api/prove and /api/prove/x, not /api/prover
                hit = path == want or path.startswith(want.rstrip("/") + "/")
            if hit:
                found.append(entry["backend"]["service"])
    return found


def test_ingress_timeouts_exceed_graceful_timeout(tmp_path):
    env = {k: v for k, v in deployment_env().items() if v is not None}
    graceful = settings_for(env, tmp_path)["graceful_timeout"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(_annotation(name)) > graceful, f"{name} {_annotation(name)} s <= graceful_timeout {graceful} s"


def test_ingress_body_limit_exceeds_max_body_bytes(tmp_path):
    env = {k: v for k, v in deployment_env().items() if v is not None}
    cap = settings_for(env, tmp_path)["max_body_bytes"]
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", _annotation("proxy-body-size").lower()).groups()
    limit = int(number) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit]
    assert limit > cap, "nginx would answer 413 (HTML) before the worker's own JSON 413"


def test_ingress_retries_a_busy_pod_with_the_buffered_body():
    conditions = _annotation("proxy-next-upstream").split()
    assert "http_503" in conditions and "non_idempotent" in conditions  # /api/prove is a POST
    assert int(_annotation("proxy-next-upstream-tries")) >= 2
    assert _annotation("proxy-request-buffering") == "on", "a retry needs the whole body"


def test_ingress_routes_public_endpoints_to_the_service_and_hides_metrics():
    objects = k8s_objects()
    service = objects["Service"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for path in PUBLIC:
        [backend] = _routes(path) or [None]
        assert backend is not None, f"{path} is not routed"
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"].get("name") in port_names or backend["port"].get("number") == 80
    for path in PRIVATE:
        assert not _routes(path), f"{path} must not be reachable through the Ingress"


# ---------------------------------------------------------------- Cloudflare Worker

@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory):
    """A copy of deploy/cloudflare with node_modules from package-lock.json (`npm ci`, no install
    scripts needed); kept out of the repo so deploy/ holds only its own files."""
    npm = shutil.which("npm")
    assert npm, "npm is required (README: set-up needs Node.js and npm)"
    work = tmp_path_factory.mktemp("cloudflare") / "worker"
    shutil.copytree(CLOUDFLARE, work, ignore=shutil.ignore_patterns("node_modules"))
    proc = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work


def tsc(worker_dir, *args):
    return subprocess.run([os.path.join(worker_dir, "node_modules", ".bin", "tsc"), *args],
                          cwd=worker_dir, capture_output=True, text=True, timeout=300)


def test_worker_lockfile_pins_package_json():
    package = json.loads(read(os.path.join(CLOUDFLARE, "package.json")))
    lock = json.loads(read(os.path.join(CLOUDFLARE, "package-lock.json")))
    root = lock["packages"][""]
    assert root["dependencies"] == package["dependencies"]
    assert root["devDependencies"] == package["devDependencies"]
    for name, version in {**package["dependencies"], **package["devDependencies"]}.items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


def test_worker_typechecks(worker_dir):
    proc = tsc(worker_dir, "--noEmit", "-p", "tsconfig.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_retries_busy_instances(worker_dir, tmp_path):
    proc = tsc(worker_dir, "--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler",
               "--strict", "--outDir", str(tmp_path), os.path.join("src", "forward.ts"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "package.json").write_text('{"type": "module"}')
    proc = subprocess.run(["node", "--test", os.path.join(ROOT, "tests", "packaging", "forward.test.mjs")],
                          env=dict(os.environ, FORWARD_JS=str(tmp_path / "forward.js")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and re.search(r"^# fail 0$", proc.stdout, re.M), proc.stdout + proc.stderr
    assert int(re.search(r"^# pass (\d+)$", proc.stdout, re.M).group(1)) >= 7


def test_worker_forwards_verify_with_retries_and_keeps_metrics_private():
    source = read(os.path.join(CLOUDFLARE, "src", "index.ts"))
    metrics = source.index('app.all("/metrics"')
    assert metrics < source.index('app.all("/*"'), "the /metrics route must come before the catch-all"
    assert re.search(r'app\.all\("/metrics", \(c\) => c\.json\([^;]*, 404\)\);', source)
    assert re.search(r'path === "/api/verify" \|\| path.startsWith\("/api/verify/"\)', source)
    assert re.search(r"isProveRoute\(path\) \|\| isVerifyRoute\(path\) \? BUSY_ATTEMPTS : 1", source)
    assert "forward(c.req.raw" in source and "getRandom" not in source
