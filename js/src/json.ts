/**
 * JSON that keeps integers past 2**53 exact, as `bigint`.
 *
 * The runtime reports the seed it drew for each generation (a u64, e.g. 8906081950817562236),
 * and sending that seed back is how a sampled generation is reproduced. `JSON.parse` would round
 * it to the nearest double and silently change the seed, so integer literals that are not safe
 * integers become `bigint` here, and `bigint` values are written back as bare integer literals.
 * Written by hand: the platform's `JSON.parse` reviver cannot see a number's source text (before
 * Node 21), and no runtime dependency is wanted for one field.
 */

// A JSON string (skipped as a whole, so digits inside text are never touched) or a number.
const TOKEN = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
const MARK = "\u0000realm-bigint:";
const MARKED = /"\\u0000realm-bigint:(-?\d+)"/g;

/** `JSON.parse`, except that unsafe integers come back as `bigint`. */
export function parseJson(text: string): unknown {
  let marked = false;
  const safe = text.replace(TOKEN, (tok) => {
    if (tok.startsWith("\"") || /[.eE]/.test(tok) || Number.isSafeInteger(Number(tok))) {
      return tok;
    }
    marked = true;
    return `"\\u0000realm-bigint:${tok}"`;
  });
  if (!marked) return JSON.parse(text);
  return JSON.parse(safe, (_key, value: unknown) =>
    typeof value === "string" && value.startsWith(MARK) ? BigInt(value.slice(MARK.length)) : value);
}

/** `JSON.stringify`, except that `bigint` values are written as integer literals. */
export function stringifyJson(value: unknown): string {
  let marked = false;
  const text = JSON.stringify(value, (_key, v: unknown) => {
    if (typeof v !== "bigint") return v;
    marked = true;
    return MARK + v.toString();
  });
  return marked ? text.replace(MARKED, "$1") : text;
}
