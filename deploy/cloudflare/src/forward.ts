// Forwarding a request to one of several container instances, retrying another
// instance when one answers 503 (all its proof slots busy, its queue full, or it
// cannot prove right now) or cannot be reached. No Cloudflare imports, so Node
// runs its tests (tests/cloudflare/forward.test.mjs, from tests/test_deploy_edge.py).

/** What a container stub offers (a Durable Object stub's fetch). */
export interface Upstream {
  fetch(request: Request): Promise<Response>;
}

export interface ForwardOptions {
  /** Container instances to spread over (instance-0 .. instance-<n-1>). */
  instances: number;
  /** Instances tried at most, each a different one (capped at `instances`). */
  attempts: number;
  /** Deadline for all attempts together, in milliseconds. */
  timeoutMs: number;
  /** Source of randomness in [0, 1); Math.random by default. */
  random?: () => number;
}

/** `count` distinct instance indexes in [0, instances), in random order. */
export function pickInstances(instances: number, count: number, random: () => number = Math.random): number[] {
  const order = Array.from({ length: instances }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order.slice(0, Math.max(1, Math.min(count, instances)));
}

/**
 * Send `request` to instances picked by `pickInstances` until one answers
 * something other than 503, the attempts run out (then the last 503 is
 * returned), or the deadline passes ("timeout"). The body is read once into
 * memory so that it can be sent again. A failure to reach the last instance
 * tried is thrown.
 */
export async function forward(
  request: Request,
  stubFor: (index: number) => Upstream,
  options: ForwardOptions,
): Promise<Response | "timeout"> {
  const deadline = Date.now() + options.timeoutMs;
  const hasBody = request.method !== "GET" && request.method !== "HEAD";
  const body = hasBody ? await request.arrayBuffer() : null;
  const picked = pickInstances(options.instances, options.attempts, options.random);
  for (const [n, index] of picked.entries()) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) return "timeout";
    const attempt = new Request(request.url, { method: request.method, headers: request.headers, body });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), remaining);
    });
    try {
      const answer = await Promise.race([stubFor(index).fetch(attempt), expired]);
      if (answer === "timeout" || answer.status !== 503 || n === picked.length - 1) return answer;
      await answer.body?.cancel();
    } catch (error) {
      if (n === picked.length - 1) throw error;
      console.warn(`instance-${index} unreachable, trying another: ${error instanceof Error ? error.message : error}`);
    } finally {
      if (timer !== undefined) clearTimeout(timer);
    }
  }
  return "timeout"; // not reached: the last attempt returns or throws
}
