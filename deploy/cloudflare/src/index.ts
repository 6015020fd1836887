// Cloudflare Worker in front of bb-worker containers: the same routes and timeouts
// as the Rust worker's setup it replaces (Hono app under /api, CORS, 120 s for
// proofs, 30 s for the rest), forwarding /api/* requests to a container, except
// /api/metrics, which stays private. A proof or verification that gets a 503
// (that instance's proof slots busy) is retried on another instance.
//
// The container is the image built from ../../Dockerfile (linux/amd64). It is
// stateless: requests are spread over CONTAINER_INSTANCES instances (at most
// max_instances in wrangler.jsonc); each proves MAX_CONCURRENT_PROOFS at once and
// queues the rest for up to QUEUE_TIMEOUT_SECONDS (then answers 503 + Retry-After).
import { Container, getContainer } from "@cloudflare/containers";
import { Hono } from "hono";
import type { Context } from "hono";
import { cors } from "hono/cors";
import { logger } from "hono/logger";

import { forward } from "./forward";

// ---------------------------------------------------------------- container settings
// Passed to the container as environment variables (see the README's settings).
const PROVE_TIMEOUT_SECONDS = 90; // bb's deadline per proof
const QUEUE_TIMEOUT_SECONDS = 30; // wait for a free proof slot
const MAX_CONCURRENT_PROOFS = 2; // bb at once per container: standard-3's 2 vCPU, split when requests queue

// Requests spread over this many container instances (<= max_instances in wrangler.jsonc).
const CONTAINER_INSTANCES = 5;
// A proof or verification answered 503 (busy) goes to another instance, up to this many in all.
const BUSY_ATTEMPTS = 3;

// ---------------------------------------------------------------- Worker timeouts
// A proof may wait for a slot, then run: QUEUE + PROVE = 120 s, the Rust setup's
// prove timeout. Past it the container has already answered 503 or 504 itself.
const PROVE_ROUTE_TIMEOUT_MS = (QUEUE_TIMEOUT_SECONDS + PROVE_TIMEOUT_SECONDS) * 1000;
const OTHER_ROUTE_TIMEOUT_MS = 30_000;

export class BbWorkerContainer extends Container<Env> {
  defaultPort = 8080; // the image's PORT / EXPOSE
  sleepAfter = "5m"; // stop an idle instance after 5 minutes (in-flight proofs keep it up)
  enableInternet = false; // the image carries bb, the VK and the CRS: no downloads at run time
  pingEndpoint = "localhost/api/health";
  envVars = {
    PROVE_TIMEOUT_SECONDS: String(PROVE_TIMEOUT_SECONDS),
    QUEUE_TIMEOUT_SECONDS: String(QUEUE_TIMEOUT_SECONDS),
    MAX_CONCURRENT_PROOFS: String(MAX_CONCURRENT_PROOFS),
    WEB_CONCURRENCY: "1",
  };

  override onStart(): void {
    console.log("bb-worker container started");
  }

  override onStop(): void {
    console.log("bb-worker container stopped");
  }

  override onError(error: unknown): unknown {
    console.log("bb-worker container error:", error instanceof Error ? error.message : String(error));
    throw error;
  }
}

export interface Env {
  BB_WORKER: DurableObjectNamespace<BbWorkerContainer>;
}

const app = new Hono<{ Bindings: Env }>().basePath("/api");

app.use("*", logger());
app.use(
  "*",
  cors({
    origin: "*",
    allowMethods: ["GET", "HEAD", "POST", "OPTIONS"],
    allowHeaders: ["Content-Type", "Content-Encoding", "Accept", "Authorization", "If-None-Match"],
    exposeHeaders: ["Content-Length", "X-Request-Id", "Retry-After", "X-Public-Inputs", "ETag"],
    maxAge: 86400,
  }),
);

// GET /api: what this service offers (answered by the Worker, as in the Rust setup).
app.get("/", (c) =>
  c.json({
    name: "Noir ZK Proof Service",
    runtime: "Python + Barretenberg CLI (bb-worker)",
    endpoints: {
      "POST /api/prove": "Generate a ZK proof from a gzipped witness",
      "POST /api/verify": "Check a proof against the served verification key",
      "GET /api/vk": "The verification key",
      "GET /api/health": "Health check (readiness)",
      "GET /api/live": "Liveness",
      "GET /api/openapi.json": "OpenAPI 3.1 description of the container's API",
    },
  }),
);

function isProveRoute(path: string): boolean {
  return path === "/api/prove" || path.startsWith("/api/prove/");
}

function isVerifyRoute(path: string): boolean {
  return path === "/api/verify" || path.startsWith("/api/verify/");
}

// Metrics are for the operator's Prometheus, not the internet: scrape the
// containers from inside, never through this Worker.
app.all("/metrics", (c) => c.json({ error: "Not found", message: "the requested resource does not exist" }, 404));

// Every other /api/* request goes to a container: /api/prove, /api/verify,
// /api/health and whatever else the container serves (its 404 and 405 answers
// included). Proofs and verifications try up to BUSY_ATTEMPTS instances.
app.all("/*", async (c: Context<{ Bindings: Env }>) => {
  const path = new URL(c.req.url).pathname;
  const timeoutMs = isProveRoute(path) ? PROVE_ROUTE_TIMEOUT_MS : OTHER_ROUTE_TIMEOUT_MS;
  const attempts = isProveRoute(path) || isVerifyRoute(path) ? BUSY_ATTEMPTS : 1;
  try {
    const stubFor = (index: number) => getContainer(c.env.BB_WORKER, `instance-${index}`);
    const answer = await forward(c.req.raw, stubFor, { instances: CONTAINER_INSTANCES, attempts, timeoutMs });
    if (answer === "timeout") {
      const title = isProveRoute(path) ? "Proof generation timed out" : "Gateway timeout";
      return c.json({ error: title, message: `no answer from the container within ${timeoutMs / 1000} s` }, 504);
    }
    return answer;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    console.error(`${c.req.method} ${path}: container unreachable: ${message}`);
    c.header("Retry-After", "5");
    return c.json({ error: "Service unavailable", message: `container unreachable: ${message}` }, 503);
  }
});

app.onError((err, c) => {
  console.error("Worker error:", err.message);
  return c.json({ error: "Internal server error", message: err.message }, 500);
});

export default app;
