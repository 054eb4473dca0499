/**
 * `HttpClient`: requests to one realm-nb runtime over the platform's `fetch`.
 *
 * It owns what every call shares: the base URL, the bearer key, the `X-Realm-Tenant` header (sent
 * only when a tenant is named: a plain key acts as its own tenant), bigint-safe JSON, and turning
 * failures into the error family: an error body becomes its `RealmError` class, a network failure
 * a `ServerConnectionError` naming the URL, and an abort rejects with the signal's reason (as
 * `fetch` itself does).
 */

import { errorFromPayload, RealmError, ServerConnectionError } from "./errors.js";
import { parseJson, stringifyJson } from "./json.js";

export type Fetch = typeof globalThis.fetch;

export interface HttpClientOptions {
  endpoint: string;
  apiKey?: string | undefined;
  tenant?: string | undefined;
  fetch?: Fetch | undefined;
}

/** The base URL without a trailing "/" or "/v1" (both spellings are accepted). */
export function baseUrl(endpoint: string): string {
  let base = endpoint.trim().replace(/\/+$/, "");
  if (base.endsWith("/v1")) base = base.slice(0, -3);
  return base;
}

export class HttpClient {
  readonly endpoint: string;
  readonly tenant: string | undefined;
  readonly #apiKey: string | undefined;
  readonly #fetch: Fetch;

  constructor(options: HttpClientOptions) {
    this.endpoint = baseUrl(options.endpoint);
    this.tenant = options.tenant;
    this.#apiKey = options.apiKey;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") {
      throw new ServerConnectionError(
        "this JavaScript platform has no fetch(); use Node >= 18 or pass options.fetch");
    }
    this.#fetch = f.bind(globalThis);
  }

  headers(accept: "json" | "sse", body: boolean): Record<string, string> {
    const h: Record<string, string> = {
      Accept: accept === "json" ? "application/json" : "text/event-stream",
    };
    if (body) h["Content-Type"] = "application/json";
    if (this.#apiKey) h["Authorization"] = `Bearer ${this.#apiKey}`;
    if (this.tenant !== undefined) h["X-Realm-Tenant"] = this.tenant;
    return h;
  }

  /**
   * A JSON call; resolves to the parsed body, rejects with the error family. A POST always
   * carries a JSON body (`{}` at least): the server refuses state changes that are not JSON.
   */
  async json(method: "GET" | "POST", path: string, body?: unknown,
             signal?: AbortSignal): Promise<unknown> {
    const payload = method === "POST" ? body ?? {} : undefined;
    const response = await this.send(method, path, payload, signal, "json");
    const text = await this.#read(response, signal);
    try {
      return parseJson(text);
    } catch (e) {
      throw new ServerConnectionError(
        `${this.endpoint}${path} answered with something that is not JSON: ` +
          `${JSON.stringify(text.slice(0, 120))}; is this a realm-nb server?`,
        { param: "endpoint", cause: e });
    }
  }

  /** Send a request; an HTTP error status rejects with its error class. */
  async send(method: "GET" | "POST", path: string, body: unknown, signal: AbortSignal | undefined,
             accept: "json" | "sse"): Promise<Response> {
    let response: Response;
    try {
      const init: RequestInit = { method, headers: this.headers(accept, body !== undefined) };
      if (body !== undefined) init.body = stringifyJson(body);
      if (signal !== undefined) init.signal = signal;
      response = await this.#fetch(this.endpoint + path, init);
    } catch (e) {
      throw this.failure(e, signal);
    }
    if (response.status >= 400) throw await this.#error(response, signal);
    return response;
  }

  /** What a thrown fetch/read error means: the abort's reason, or an unreachable server. */
  failure(e: unknown, signal?: AbortSignal, requestId?: string | null): unknown {
    if (signal?.aborted) return signal.reason;
    if (e instanceof RealmError) return e;
    const why = e instanceof Error ? `${e.name}: ${e.message}` +
      (e.cause instanceof Error ? ` (${e.cause.message})` : "") : String(e);
    const message = requestId
      ? `the realm-nb server at ${this.endpoint} dropped request ${requestId} mid-way (${why}); ` +
        "it may have stopped or crashed"
      : `cannot reach the realm-nb server at ${this.endpoint}: ${why}. ` +
        "Is `realm-nb serve` running there?";
    return new ServerConnectionError(message, { param: "endpoint", cause: e });
  }

  async #read(response: Response, signal?: AbortSignal): Promise<string> {
    try {
      return await response.text();
    } catch (e) {
      throw this.failure(e, signal);
    }
  }

  async #error(response: Response, signal?: AbortSignal): Promise<RealmError> {
    const text = await this.#read(response, signal);
    let payload: unknown;
    try {
      payload = parseJson(text);
    } catch {
      const message = `server answered HTTP ${response.status}: ${text.slice(0, 200)}`;
      payload = { error: { message } };
    }
    const retry = Number(response.headers.get("Retry-After"));
    return errorFromPayload(payload, response.status, retry > 0 ? retry : undefined);
  }
}
