"""The read-only endpoints: readiness, liveness, the verification key, metrics, the OpenAPI document.

    GET /api/health[/<circuit>]  readiness (health.Health): 503 with reasons when a proof cannot succeed
    GET /api/live                liveness: 200 while the process answers
    GET /api/vk[/<circuit>]      the VK, base64, with an ETag
    GET /api/metrics             Prometheus text format (server.metrics)
    GET /api/openapi.json        the OpenAPI 3.1 description of the API (openapi.json beside this module)
"""
import base64
import hashlib
import os

from bbworker.errors import ProverError
from bbworker.server import metrics
from bbworker.settings import DEFAULT_CIRCUIT
from bbworker.web.service import Reply, json_reply

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


class Pages:
    """The read-only endpoints of `service` (service.ProverService); `openapi`: the document's bytes."""

    def __init__(self, service, openapi=b"{}"):
        self.service = service
        self.openapi = openapi

    def health(self, environ, name=None):
        """Readiness: 503 with the reasons whenever a proof (of circuit `name`) cannot succeed."""
        ready, payload = self.service.health.check()
        if name is not None:
            circuit = payload.get("circuits", {}).get(name, {"ready": ready, "reasons": payload.get("reasons", [])})
            payload.update(circuit=name, status="ok" if circuit["ready"] else payload["status"])
            payload["reasons"] = circuit["reasons"]
            ready = circuit["ready"]
        if ready:
            return json_reply(200, payload)
        return json_reply(503, payload, [("Retry-After", str(self.service.health.retry_after(payload["reasons"], name)))])

    def live(self, environ):
        """Liveness: 200 while this process answers requests."""
        return json_reply(200, self.service.health.live())

    def openapi_document(self, environ):
        return Reply(200, self.openapi, "application/json", [("Cache-Control", "no-cache")])

    def metrics(self, environ):
        bb = self.service.health.bb
        status = bb.status()
        if status.available:
            metrics.BB_INFO.labels(status.version, bb.verifier_target or "default").set(1)
        body, content_type = metrics.render()
        return Reply(200, body, content_type, [])

    def vk(self, environ, name):
        """Circuit `name`'s VK: {"vk", "vk_hash", "bb_version", "verifier_target", "circuit"}, with an ETag."""
        service = self.service
        circuit = service.circuits[name]
        service.refuse_unless_ready(environ, name)  # a VK that failed is not computed again per call
        try:
            if not circuit.vk.cached():
                service.compute_vk(circuit)
            vk, vk_hash = circuit.vk.read()
            version = circuit.bb.version()
        except ProverError as exc:
            raise service.failed(environ, exc) from None
        reply = json_reply(200, {"vk": base64.b64encode(vk).decode(), "vk_hash": "0x" + vk_hash.hex(),
                                 "bb_version": version, "verifier_target": circuit.verifier_target,
                                 "circuit": None if name == DEFAULT_CIRCUIT else name})
        etag = f'"{hashlib.sha256(reply.body).hexdigest()[:32]}"'
        wanted = [t.strip().removeprefix("W/") for t in environ.get("HTTP_IF_NONE_MATCH", "").split(",")]
        if etag in wanted or "*" in wanted:
            return Reply(304, b"", None, [("ETag", etag)])
        return reply._replace(headers=[("ETag", etag), ("Cache-Control", "no-cache")])
