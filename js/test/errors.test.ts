import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  AuthenticationError, ERROR_CLASSES, errorFromPayload, GuestTrap, InvalidRequestError,
  ModelNotFoundError, RateLimitError, RealmError,
} from "realm-nb";

import { python } from "./helpers.js";

interface Row { type: string; parent: string | null; status: number; code: string }

describe("the error family", () => {
  it("mirrors the Python SDK's classes: names, parents, statuses and codes", async () => {
    // The reference is read from realm_nb.errors itself, never retyped here.
    const out = await python(`
import json, realm_nb.errors as E
rows = []
def walk(c, parent):
    rows.append({"type": c.__name__, "parent": parent, "status": c.status_code, "code": c.code})
    for s in c.__subclasses__():
        walk(s, c.__name__)
walk(E.RealmError, None)
print(json.dumps(rows))`);
    const fromPython = (JSON.parse(out) as Row[]).sort((a, b) => a.type.localeCompare(b.type));
    const fromJs: Row[] = ERROR_CLASSES.map((c) => {
      const parent = Object.getPrototypeOf(c) as typeof RealmError;
      return { type: c.type, parent: c === RealmError ? null : parent.type, status: c.status,
               code: c.code };
    }).sort((a, b) => a.type.localeCompare(b.type));
    assert.deepEqual(fromJs, fromPython);
  });

  it("falls back on the same class as the Python SDK for a body that names none", async () => {
    const statuses = [400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503];
    const out = await python(`
import json
from realm_nb.errors import error_from_payload
statuses = ${JSON.stringify(statuses)}
print(json.dumps([type(error_from_payload({}, s)).__name__ for s in statuses]))`);
    assert.deepEqual(statuses.map((s) => errorFromPayload({}, s).type), JSON.parse(out));
  });

  it("builds the class a server body names, with its message, param and status", () => {
    const body = { error: { message: "guest trapped: out of fuel", type: "GuestTrap",
                            code: "guest_trap", param: null } };
    const e = errorFromPayload(body, 500);
    assert.ok(e instanceof GuestTrap && e instanceof RealmError && e instanceof Error);
    assert.equal(e.message, "guest trapped: out of fuel");
    assert.equal(e.name, "GuestTrap");
    assert.equal(e.code, "guest_trap");
    const body404 = { error: { message: "no", type: "ModelNotFoundError", param: "model" } };
    const m = errorFromPayload(body404, 404);
    assert.ok(m instanceof ModelNotFoundError);
    assert.equal(m.param, "model");
    assert.equal(m.status, 404);
  });

  it("falls back on the HTTP status when the body names no class it knows", () => {
    assert.ok(errorFromPayload({ error: { message: "x", type: "invalid_request_error" } }, 401)
      instanceof AuthenticationError);
    assert.ok(errorFromPayload("not json at all", 422) instanceof InvalidRequestError);
    const e = errorFromPayload({}, 502);
    assert.equal(e.constructor, RealmError);
    assert.equal(e.status, 502);
    const r = errorFromPayload({ error: { type: "RateLimitError", message: "slow down" } }, 429, 2);
    assert.ok(r instanceof RateLimitError);
    assert.equal(r.retryAfter, 2);
  });
});
