// Behaviour of deploy/cloudflare/src/forward.ts (compiled by tests/test_deploy_edge.py
// into the module FORWARD_JS names), with fake container stubs: node --test.
import assert from "node:assert/strict";
import { test } from "node:test";

const { forward, pickInstances } = await import(process.env.FORWARD_JS);

const WITNESS = new Uint8Array([0x1f, 0x8b, 8, 0, 1, 2, 3, 250]);

// Stubs that answer from `script` (index -> function(request) -> Response) and record each call.
function stubs(script) {
  const calls = [];
  const stubFor = (index) => ({
    async fetch(request) {
      calls.push({ index, method: request.method, url: request.url, auth: request.headers.get("authorization"),
                   body: new Uint8Array(await request.arrayBuffer()) });
      return script(index, calls.length);
    },
  });
  return { calls, stubFor };
}

const busy = () => new Response('{"error":"Service unavailable"}', { status: 503, headers: { "Retry-After": "1" } });
const proof = () => new Response('{"success":true}', { status: 200 });
const prove = () => new Request("https://w.example/api/prove", {
  method: "POST", body: WITNESS, headers: { Authorization: "Bearer t0ken", "Content-Type": "application/gzip" } });

test("a 503 is retried on another instance with the same request", async () => {
  const { calls, stubFor } = stubs((_, n) => (n === 1 ? busy() : proof()));
  const answer = await forward(prove(), stubFor, { instances: 5, attempts: 3, timeoutMs: 5000 });
  assert.equal(answer.status, 200);
  assert.equal(calls.length, 2);
  assert.notEqual(calls[0].index, calls[1].index);
  for (const call of calls) {
    assert.equal(call.method, "POST");
    assert.equal(call.url, "https://w.example/api/prove");
    assert.equal(call.auth, "Bearer t0ken");
    assert.deepEqual(call.body, WITNESS);
  }
});

test("when every instance tried is busy, the last 503 is the answer", async () => {
  const { calls, stubFor } = stubs(() => busy());
  const answer = await forward(prove(), stubFor, { instances: 5, attempts: 3, timeoutMs: 5000 });
  assert.equal(answer.status, 503);
  assert.equal(answer.headers.get("retry-after"), "1");
  assert.equal(calls.length, 3);
  assert.equal(new Set(calls.map((c) => c.index)).size, 3);
});

test("other statuses are not retried", async () => {
  for (const status of [200, 400, 401, 422, 500, 504]) {
    const { calls, stubFor } = stubs(() => new Response("{}", { status }));
    const answer = await forward(prove(), stubFor, { instances: 5, attempts: 3, timeoutMs: 5000 });
    assert.equal(answer.status, status);
    assert.equal(calls.length, 1);
  }
});

test("one attempt means no retry", async () => {
  const { calls, stubFor } = stubs(() => busy());
  const answer = await forward(new Request("https://w.example/api/health"), stubFor,
                               { instances: 5, attempts: 1, timeoutMs: 5000 });
  assert.equal(answer.status, 503);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].method, "GET");
});

test("an unreachable instance is skipped; the last failure is thrown", async () => {
  const down = (index) => ({ fetch: async () => { throw new Error(`instance ${index} down`); } });
  const { calls, stubFor } = stubs(() => proof());
  let n = 0;
  const answer = await forward(prove(), (i) => (n++ === 0 ? down(i) : stubFor(i)),
                               { instances: 5, attempts: 3, timeoutMs: 5000 });
  assert.equal(answer.status, 200);
  assert.equal(calls.length, 1);
  await assert.rejects(forward(prove(), down, { instances: 5, attempts: 2, timeoutMs: 5000 }), /down/);
});

test("the deadline covers all attempts", async () => {
  const hang = () => ({ fetch: () => new Promise(() => {}) });
  const started = Date.now();
  assert.equal(await forward(prove(), hang, { instances: 5, attempts: 3, timeoutMs: 100 }), "timeout");
  assert.ok(Date.now() - started < 2000);
});

test("instances are distinct, in range, capped by how many exist", () => {
  for (let seed = 0; seed < 50; seed++) {
    const picked = pickInstances(5, 3);
    assert.equal(picked.length, 3);
    assert.equal(new Set(picked).size, 3);
    assert.ok(picked.every((i) => Number.isInteger(i) && i >= 0 && i < 5));
  }
  assert.deepEqual(pickInstances(2, 3, () => 0).sort(), [0, 1]);
  assert.deepEqual(pickInstances(1, 3), [0]);
});
