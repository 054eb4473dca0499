//! realm-nb guest: the token loop and the sampler of one tenant, inside its WebAssembly sandbox.
//!
//! The written contract is `realm_nb/abi.py`; this file implements the guest side of ABI 1.0:
//!   exports  realm_abi_version, realm_alloc, realm_generate, memory
//!   imports  realm_host.forward, realm_host.emit, realm_host.memory64_load_layer, realm_host.log
//! Build: `python -m realm_nb.guest_build` (Zig 0.17, wasm32-freestanding, ReleaseFast).
//! Written without `std` so that nothing in it depends on the standard library's churn.

// ---------------------------------------------------------------------------------------------
// ABI constants (mirror realm_nb/abi.py)
// ---------------------------------------------------------------------------------------------

const ABI_VERSION_MAJOR: u32 = 1;
const ABI_VERSION_MINOR: u32 = 0;

const BAD_POINTER: i32 = -1;
const BAD_REQUEST: i32 = -5;
const HOST_ERROR: i32 = -6;
const OUT_OF_MEMORY: i32 = -8;

const REQUEST_MAGIC: u32 = 0x514D4C52; // b"RLMQ" read as a little-endian u32
const HEADER_BYTES: usize = 64;
// The request limits, written from realm_nb/limits.py (the one table the host checks too).
const limits = @import("limits.zig");
const MAX_CANDIDATES: usize = limits.MAX_CANDIDATES;
const PAGE: u64 = 65536;

// ---------------------------------------------------------------------------------------------
// Host imports (module "realm_host"); every argument and result is an i32
// ---------------------------------------------------------------------------------------------

extern "realm_host" fn forward(tokens_ptr: i32, n_tokens: i32, logits_ptr: i32) i32;
extern "realm_host" fn emit(token: i32) i32;
extern "realm_host" fn memory64_load_layer(layer: i32) i32;
extern "realm_host" fn log(ptr: i32, len: i32) i32;

fn addr(p: anytype) i32 {
    return @bitCast(@as(u32, @intCast(@intFromPtr(p))));
}

// ---------------------------------------------------------------------------------------------
// Allocator: a bump pointer over memory.grow. Everything allocated (the request the host copied
// in included) is released when realm_generate returns; memory is never given back to the host.
// ---------------------------------------------------------------------------------------------

extern var __heap_base: u8;
var heap_start: usize = 0;
var heap_top: usize = 0;

fn alignUp(x: u64, a: u64) u64 {
    return (x + a - 1) & ~(a - 1);
}

fn alloc(len: usize) ?[*]u8 {
    if (heap_start == 0) {
        heap_start = @intCast(alignUp(@intFromPtr(&__heap_base), 16));
        heap_top = heap_start;
    }
    const start = alignUp(heap_top, 16);
    const end = start + @as(u64, len);
    const have = @as(u64, @wasmMemorySize(0)) * PAGE;
    if (end > have) {
        const pages = (end - have + PAGE - 1) / PAGE;
        if (end > 0xFFFF_FFFF or @wasmMemoryGrow(0, @intCast(pages)) < 0) return null;
    }
    heap_top = @intCast(end);
    return @ptrFromInt(@as(usize, @intCast(start)));
}

export fn realm_alloc(len: i32) i32 {
    if (len < 0) return 0;
    const p = alloc(@intCast(len)) orelse return 0;
    return addr(p);
}

export fn realm_abi_version() i32 {
    return @bitCast((ABI_VERSION_MAJOR << 16) | ABI_VERSION_MINOR);
}

// ---------------------------------------------------------------------------------------------
// PCG32 (O'Neill, pcg-c-basic): seeded as pcg32_srandom(seed, 0xda3e39cb94b95bdb)
// ---------------------------------------------------------------------------------------------

const Pcg32 = struct {
    state: u64,
    inc: u64,

    fn init(seed: u64, seq: u64) Pcg32 {
        var rng = Pcg32{ .state = 0, .inc = (seq << 1) | 1 };
        _ = rng.next();
        rng.state +%= seed;
        _ = rng.next();
        return rng;
    }

    fn next(self: *Pcg32) u32 {
        const old = self.state;
        self.state = old *% 6364136223846793005 +% self.inc;
        const xorshifted: u32 = @truncate(((old >> 18) ^ old) >> 27);
        const rot: u5 = @intCast(old >> 59);
        return (xorshifted >> rot) | (xorshifted << (0 -% rot));
    }

    /// Uniform float in [0, 1) from the top 24 bits.
    fn uniform(self: *Pcg32) f32 {
        return @as(f32, @floatFromInt(self.next() >> 8)) * (1.0 / 16777216.0);
    }
};

// ---------------------------------------------------------------------------------------------
// Sampler: repetition penalty -> (greedy | temperature -> top-K heap -> softmax -> top-p -> min-p
// -> draw). Candidates are always capped at MAX_CANDIDATES: never a sort of the whole vocabulary.
// ---------------------------------------------------------------------------------------------

const Candidate = struct { logit: f32, id: u32 };

/// a ranks below b: smaller logit, or the same logit and a larger id (lowest id wins ties).
fn below(a: Candidate, b: Candidate) bool {
    return a.logit < b.logit or (a.logit == b.logit and a.id > b.id);
}

fn siftDown(h: []Candidate, start: usize, n: usize) void {
    var i = start;
    while (true) {
        const l = 2 * i + 1;
        if (l >= n) return;
        var m = l;
        if (l + 1 < n and below(h[l + 1], h[l])) m = l + 1;
        if (!below(h[m], h[i])) return;
        const t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

fn siftUp(h: []Candidate, start: usize) void {
    var i = start;
    while (i > 0) {
        const p = (i - 1) / 2;
        if (!below(h[i], h[p])) return;
        const t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

const F4 = @Vector(4, f32);
const U4 = @Vector(4, u32);
const inf: f32 = @bitCast(@as(u32, 0x7F800000));

const Params = struct {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
};

const Sampler = struct {
    vocab: usize,
    logits: []f32, // f32[V], written by the host's forward
    seen: []u8, // bitset over V, all zero between calls
    heap: []Candidate, // [MAX_CANDIDATES] min-heap of the best k
    pending: []Candidate, // [MAX_CANDIDATES + 4] logits above the threshold, not yet in the heap
    probs: []f32, // [MAX_CANDIDATES]
    recent: []i32, // ring of the last repeat_window tokens (prompt + generated)
    recent_len: usize,
    recent_pos: usize,
    rng: Pcg32,
    params: Params,

    fn remember(self: *Sampler, token: i32) void {
        if (self.recent.len == 0) return;
        self.recent[self.recent_pos] = token;
        self.recent_pos = (self.recent_pos + 1) % self.recent.len;
        if (self.recent_len < self.recent.len) self.recent_len += 1;
    }

    /// llama.cpp's rule, each distinct recent token once: logit > 0 -> logit / p, else logit * p.
    fn penalize(self: *Sampler) void {
        const pen = self.params.repeat_penalty;
        if (pen == 1.0 or self.recent_len == 0) return;
        for (self.recent[0..self.recent_len]) |t| {
            const u: usize = @intCast(t);
            const bit: u8 = @as(u8, 1) << @intCast(u & 7);
            if (self.seen[u >> 3] & bit != 0) continue;
            self.seen[u >> 3] |= bit;
            const l = self.logits[u];
            self.logits[u] = if (l > 0) l / pen else l * pen;
        }
        for (self.recent[0..self.recent_len]) |t| {
            const u: usize = @intCast(t);
            self.seen[u >> 3] = 0;
        }
    }

    /// Greedy: the largest logit, lowest id on ties; NaN never wins (id 0 if all are NaN).
    fn argmax(self: *Sampler) u32 {
        const xs = self.logits;
        const n4 = xs.len & ~@as(usize, 3);
        var best4: F4 = @splat(-inf);
        var id4: U4 = @splat(0);
        var ids: U4 = .{ 0, 1, 2, 3 };
        const four: U4 = @splat(4);
        var i: usize = 0;
        while (i < n4) : (i += 4) {
            const v: F4 = xs[i..][0..4].*;
            const better = v > best4; // strict: within a lane the earlier id keeps a tie
            best4 = @select(f32, better, v, best4);
            id4 = @select(u32, better, ids, id4);
            ids += four;
        }
        const lane_best: [4]f32 = best4;
        const lane_id: [4]u32 = id4;
        var best: f32 = -inf;
        var best_id: u32 = 0;
        for (lane_best, lane_id) |x, id| {
            if (x > best or (x == best and x > -inf and id < best_id)) {
                best = x;
                best_id = id;
            }
        }
        for (xs[n4..], n4..) |x, id| {
            if (x > best) {
                best = x;
                best_id = @intCast(id);
            }
        }
        return best_id;
    }

    /// Move the pending candidates into the min-heap of the best k; return the new threshold.
    fn flush(h: []Candidate, n: *usize, k: usize, pending: []const Candidate) f32 {
        for (pending) |c| {
            if (n.* < k) {
                h[n.*] = c;
                siftUp(h, n.*);
                n.* += 1;
            } else if (below(h[0], c)) {
                h[0] = c;
                siftDown(h, 0, n.*);
            }
        }
        return if (n.* == k) h[0].logit else -inf;
    }

    fn sample(self: *Sampler) u32 {
        self.penalize();
        const p = self.params;
        if (!(p.temperature > 0)) return self.argmax();

        // Top-K: a SIMD scan keeps only logits above the k-th best so far (the threshold), in a
        // pending buffer that is flushed into a min-heap of k; then heap-sort into descending order.
        const k: usize = if (p.top_k > 0 and p.top_k <= MAX_CANDIDATES) p.top_k else MAX_CANDIDATES;
        const h = self.heap;
        const pending = self.pending;
        var n: usize = 0;
        var np: usize = 0;
        var threshold: f32 = -inf;
        const xs = self.logits;
        const n4 = xs.len & ~@as(usize, 3);
        var base: usize = 0;
        while (base < xs.len) : (base += 4) {
            const lanes: usize = if (base < n4) 4 else xs.len - base;
            if (lanes == 4) {
                const v: F4 = xs[base..][0..4].*;
                const t: F4 = @splat(threshold);
                if (!@reduce(.Or, v > t)) continue;
            }
            for (0..lanes) |lane| {
                const x = xs[base + lane];
                if (x > threshold) {
                    pending[np] = .{ .logit = x, .id = @intCast(base + lane) };
                    np += 1;
                }
            }
            if (np >= MAX_CANDIDATES) {
                threshold = flush(h, &n, k, pending[0..np]);
                np = 0;
            }
        }
        _ = flush(h, &n, k, pending[0..np]);
        if (n == 0) return 0; // every logit NaN or -inf: nothing to weigh
        var end = n;
        while (end > 1) {
            end -= 1;
            const t = h[0];
            h[0] = h[end];
            h[end] = t;
            siftDown(h, 0, end);
        }
        if (h[0].logit == inf) return h[0].id;

        // softmax (unnormalised: probs[0] == 1), top-p on the normalised prefix, then min-p.
        // Divided, not multiplied by 1/T: for a tiny T (1e-39, subnormal) 1/T overflows to inf
        // and 0 * inf is NaN, which made the draw pick the worst kept candidate. A quotient is
        // 0 for the best logit and -inf (weight 0) for the rest: a tiny T is greedy, and
        // tokens tied with the best share the draw, as softmax does in the limit.
        var total: f32 = 0;
        for (h[0..n], 0..) |c, i| {
            const q = @exp((c.logit - h[0].logit) / p.temperature);
            self.probs[i] = q;
            total += q;
        }
        var keep = n;
        if (p.top_p < 1.0) {
            const target = p.top_p * total;
            var cum: f32 = 0;
            for (self.probs[0..n], 0..) |q, i| {
                cum += q;
                if (cum >= target) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if (p.min_p > 0) {
            const floor = p.min_p * self.probs[0];
            while (keep > 1 and self.probs[keep - 1] < floor) keep -= 1;
        }

        // renormalise over the kept prefix and draw.
        var kept: f32 = 0;
        for (self.probs[0..keep]) |q| kept += q;
        const u = self.rng.uniform() * kept;
        var acc: f32 = 0;
        for (self.probs[0..keep], 0..) |q, i| {
            acc += q;
            if (u < acc) return h[i].id;
        }
        return h[keep - 1].id;
    }
};

// ---------------------------------------------------------------------------------------------
// Request parsing (layout in realm_nb/abi.py): little-endian, 64-byte header, then arrays
// ---------------------------------------------------------------------------------------------

fn rd32(b: [*]const u8, off: usize) u32 {
    return @as(u32, b[off]) | (@as(u32, b[off + 1]) << 8) |
        (@as(u32, b[off + 2]) << 16) | (@as(u32, b[off + 3]) << 24);
}

fn rd64(b: [*]const u8, off: usize) u64 {
    return @as(u64, rd32(b, off)) | (@as(u64, rd32(b, off + 4)) << 32);
}

fn rdf(b: [*]const u8, off: usize) f32 {
    return @bitCast(rd32(b, off));
}

var token_slot: i32 = 0; // the one token handed to forward during decoding

export fn realm_generate(req_ptr: i32, req_len: i32) i32 {
    defer heap_top = heap_start; // the request and every buffer below die with this call
    if (req_ptr <= 0 or req_len < @as(i32, HEADER_BYTES)) return BAD_REQUEST;
    const base: usize = @intCast(req_ptr);
    const len: usize = @intCast(req_len);
    if (@as(u64, base) + len > @as(u64, @wasmMemorySize(0)) * PAGE) return BAD_POINTER;
    const b: [*]const u8 = @ptrFromInt(base);

    if (rd32(b, 0) != REQUEST_MAGIC) return BAD_REQUEST;
    if (rd32(b, 4) >> 16 != ABI_VERSION_MAJOR) return BAD_REQUEST;
    const vocab = rd32(b, 8);
    const n_prompt = rd32(b, 12);
    const max_tokens = rd32(b, 16);
    const params = Params{
        .top_k = rd32(b, 20),
        .temperature = rdf(b, 32),
        .top_p = rdf(b, 36),
        .min_p = rdf(b, 40),
        .repeat_penalty = rdf(b, 44),
    };
    const seed = rd64(b, 24);
    const repeat_window = rd32(b, 48);
    const n_eos = rd32(b, 52);
    if (vocab == 0 or vocab > limits.MAX_VOCAB or n_prompt == 0) return BAD_REQUEST;
    if (@as(u64, HEADER_BYTES) + 4 * (@as(u64, n_prompt) + n_eos) != len) return BAD_REQUEST;
    if (!limits.maxTokensOk(max_tokens) or !limits.topKOk(params.top_k)) return BAD_REQUEST;
    if (!limits.temperatureOk(params.temperature) or !limits.topPOk(params.top_p)) return BAD_REQUEST;
    if (!limits.minPOk(params.min_p) or !limits.repeatPenaltyOk(params.repeat_penalty)) return BAD_REQUEST;
    if (!limits.repeatWindowOk(repeat_window)) return BAD_REQUEST;
    const prompt_off = HEADER_BYTES;
    const eos_off = HEADER_BYTES + 4 * @as(usize, n_prompt);
    for (0..n_prompt) |i| {
        if (rd32(b, prompt_off + 4 * i) >= vocab) return BAD_REQUEST;
    }

    const V: usize = vocab;
    const window: usize = @intCast(@min(@as(u64, repeat_window), @as(u64, n_prompt) + max_tokens));
    const logits_mem = alloc(4 * V) orelse return OUT_OF_MEMORY;
    const seen_mem = alloc(V / 8 + 1) orelse return OUT_OF_MEMORY;
    const heap_mem = alloc(@sizeOf(Candidate) * MAX_CANDIDATES) orelse return OUT_OF_MEMORY;
    const pending_mem = alloc(@sizeOf(Candidate) * (MAX_CANDIDATES + 4)) orelse return OUT_OF_MEMORY;
    const probs_mem = alloc(4 * MAX_CANDIDATES) orelse return OUT_OF_MEMORY;
    const recent_mem = alloc(4 * window) orelse return OUT_OF_MEMORY;
    const seen = seen_mem[0 .. V / 8 + 1];
    @memset(seen, 0);

    var s = Sampler{
        .vocab = V,
        .logits = @as([*]f32, @ptrCast(@alignCast(logits_mem)))[0..V],
        .seen = seen,
        .heap = @as([*]Candidate, @ptrCast(@alignCast(heap_mem)))[0..MAX_CANDIDATES],
        .pending = @as([*]Candidate, @ptrCast(@alignCast(pending_mem)))[0 .. MAX_CANDIDATES + 4],
        .probs = @as([*]f32, @ptrCast(@alignCast(probs_mem)))[0..MAX_CANDIDATES],
        .recent = @as([*]i32, @ptrCast(@alignCast(recent_mem)))[0..window],
        .recent_len = 0,
        .recent_pos = 0,
        .rng = Pcg32.init(seed, 0xda3e39cb94b95bdb),
        .params = params,
    };
    const first = n_prompt - @min(n_prompt, @as(u32, @intCast(window)));
    for (first..n_prompt) |i| s.remember(@bitCast(rd32(b, prompt_off + 4 * i)));

    // Prefill: the whole prompt in one call (the host chunks it).
    var r = forward(@intCast(base + prompt_off), @intCast(n_prompt), addr(logits_mem));
    if (r < 0) return r;
    if (r != @as(i32, @intCast(vocab))) return HOST_ERROR;

    var emitted: i32 = 0;
    var i: u32 = 0;
    while (i < max_tokens) : (i += 1) {
        const token = s.sample();
        r = emit(@intCast(token));
        if (r < 0) return r;
        emitted += 1;
        if (r == 1 or i + 1 == max_tokens) break;
        var is_eos = false;
        for (0..n_eos) |e| {
            if (rd32(b, eos_off + 4 * e) == token) is_eos = true;
        }
        if (is_eos) break;
        s.remember(@intCast(token));
        token_slot = @intCast(token);
        r = forward(addr(&token_slot), 1, addr(logits_mem));
        if (r < 0) return r;
        if (r != @as(i32, @intCast(vocab))) return HOST_ERROR;
    }
    return emitted;
}

comptime {
    _ = &memory64_load_layer;
    _ = &log;
}
