import assert from "node:assert/strict";
import { describe, it } from "node:test";

// Internal module: the package exports no JSON helpers, so the test reads the built file.
import { parseJson, stringifyJson } from "../dist/json.js";

describe("bigint-safe JSON", () => {
  it("keeps a u64 seed exact through parse and stringify", () => {
    const wire =
      '{"seed":8906081950817562236,"max_tokens":12,"top_p":0.95,"t":1.7960144810065742e+09}';
    const parsed = parseJson(wire) as Record<string, unknown>;
    assert.equal(parsed["seed"], 8906081950817562236n);
    assert.equal(parsed["max_tokens"], 12);
    assert.equal(parsed["top_p"], 0.95);
    assert.equal(parsed["t"], 1.7960144810065742e9);
    assert.equal(stringifyJson(parsed),
                 wire.replace("1.7960144810065742e+09", "1796014481.0065742"));
  });

  it("leaves digits inside strings alone, escaped quotes included", () => {
    const wire = '{"text":"id \\"12345678901234567890\\" ok","ids":[1,-9007199254740993]}';
    const parsed = parseJson(wire) as { text: string; ids: unknown[] };
    assert.equal(parsed.text, 'id "12345678901234567890" ok');
    assert.deepEqual(parsed.ids, [1, -9007199254740993n]);
  });
});
