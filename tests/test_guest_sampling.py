"""The shipped guest's token loop and sampler, driven by a host that returns fixed logits."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from realm_nb import abi
from realm_nb.tenants import Tenant

V = 1000


class FixedLogitsHost:
    """A TenantHost whose forward always returns the same logits; records everything."""

    def __init__(self, logits: np.ndarray, stop_after: int | None = None) -> None:
        self.logits = np.asarray(logits, np.float32)
        self.stop_after = stop_after
        self.forwards: list[list[int]] = []
        self.tokens: list[int] = []

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        self.forwards.append(tokens.tolist())
        return self.logits

    def emit(self, token: int) -> int:
        self.tokens.append(token)
        return int(self.stop_after is not None and len(self.tokens) >= self.stop_after)

    def load_layer(self, layer: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@pytest.fixture(scope="module")
def tenant() -> Tenant:
    return Tenant("sampling")


def peaked_logits() -> np.ndarray:
    """Noise far below five known peaks: 7 > 3 > 500 > 42 > 999."""
    logits = np.random.default_rng(0).uniform(-12.0, -10.0, V).astype(np.float32)
    logits[[7, 3, 500, 42, 999]] = [3.0, 2.5, 2.0, 1.5, 1.0]
    return logits


def generate(
    tenant: Tenant, logits: np.ndarray, *, prompt: tuple[int, ...] = (1, 2), stop_after: int | None
    = None, **params: Any,
) -> FixedLogitsHost:
    host = FixedLogitsHost(logits, stop_after)
    params.setdefault("max_tokens", 1)
    request = abi.pack_request(vocab_size=len(logits), prompt=prompt, **params)
    assert tenant.run(request, host) == len(host.tokens)
    return host


def test_greedy_is_argmax_and_lowest_id_wins_ties(tenant: Tenant) -> None:
    logits = peaked_logits()
    assert generate(tenant, logits, temperature=0, max_tokens=5).tokens == [7] * 5
    logits[[20, 10]] = 9.0
    assert generate(tenant, logits, temperature=0).tokens == [10]


def test_greedy_with_nan_logits_ignores_them(tenant: Tenant) -> None:
    logits = peaked_logits()
    logits[[0, 5, 900]] = np.nan
    assert generate(tenant, logits, temperature=0).tokens == [7]


def test_same_seed_same_tokens_other_seed_other_tokens(tenant: Tenant) -> None:
    logits = np.random.default_rng(1).normal(size=V).astype(np.float32)
    a = generate(tenant, logits, seed=11, temperature=1.0, max_tokens=50).tokens
    b = generate(tenant, logits, seed=11, temperature=1.0, max_tokens=50).tokens
    c = generate(tenant, logits, seed=12, temperature=1.0, max_tokens=50).tokens
    assert a == b
    assert a != c
    assert len(set(a)) > 20  # a real draw, not a constant


def test_top_k_keeps_only_the_k_best(tenant: Tenant) -> None:
    logits = np.random.default_rng(2).normal(scale=0.1, size=V).astype(np.float32)
    logits[[5, 600, 61]] = [1.2, 1.1, 1.0]  # the top 3; the rest is close behind
    drawn = Counter(generate(tenant, logits, top_k=3, max_tokens=300, seed=3).tokens)
    assert set(drawn) == {5, 600, 61}
    wide = Counter(generate(tenant, logits, top_k=0, max_tokens=300, seed=3).tokens)
    assert len(wide) > 50  # without the cut the tail is drawn


def test_small_top_p_keeps_only_the_top_token(tenant: Tenant) -> None:
    logits = np.random.default_rng(4).normal(scale=0.5, size=V).astype(np.float32)
    logits[77] = 6.0  # p(77) is about 0.25
    tokens = generate(tenant, logits, top_p=0.1, max_tokens=100, seed=5).tokens
    assert set(tokens) == {77}
    assert len(set(generate(tenant, logits, top_p=1.0, max_tokens=100, seed=5).tokens)) > 10


def test_top_p_keeps_the_shortest_prefix_reaching_p(tenant: Tenant) -> None:
    logits = np.full(V, -30.0, np.float32)
    logits[[9, 8, 7]] = np.log([0.5, 0.3, 0.2])  # cumulative 0.5, 0.8, 1.0
    tokens = generate(tenant, logits, top_p=0.75, max_tokens=300, seed=6).tokens
    assert set(tokens) == {9, 8}


def test_min_p_drops_tokens_below_the_ratio(tenant: Tenant) -> None:
    logits = np.full(V, -30.0, np.float32)
    logits[[7, 3, 500]] = np.log([1.0, 0.5, 0.2])  # p / p_max = 1, 0.5, 0.2
    kept = Counter(generate(tenant, logits, min_p=0.3, max_tokens=300, seed=7).tokens)
    assert set(kept) == {7, 3}
    unfiltered = Counter(generate(tenant, logits, min_p=0.0, max_tokens=300, seed=7).tokens)
    assert set(unfiltered) == {7, 3, 500}


def test_lower_temperature_favours_the_top_token(tenant: Tenant) -> None:
    logits = np.random.default_rng(8).normal(size=50).astype(np.float32)
    best = 17
    logits[best] = logits.max() + 1.0

    def top_share(temperature: float) -> float:
        tokens = generate(tenant, logits, temperature=temperature, max_tokens=400, seed=9).tokens
        return tokens.count(best) / len(tokens)

    hot, warm, cold = top_share(2.0), top_share(1.0), top_share(0.3)
    assert hot < warm < cold
    assert cold > 0.6


def test_repeat_penalty_avoids_the_repeated_token(tenant: Tenant) -> None:
    logits = peaked_logits()
    logits[3] = 2.95  # near tie with 7 (3.0); 7 is in the prompt
    assert generate(tenant, logits, temperature=0, prompt=(7,)).tokens == [7]
    penalised = generate(tenant, logits, temperature=0, prompt=(7, 7), repeat_penalty=1.1)
    assert penalised.tokens == [3]  # 3.0 / 1.1 < 2.95
    # negative logits are multiplied: -1.0 * 1.1 < -1.05
    negative = np.full(V, -5.0, np.float32)
    negative[[7, 3]] = [-1.0, -1.05]
    assert generate(tenant, negative, temperature=0, prompt=(7,), repeat_penalty=1.1).tokens == [3]
    # outside the window the penalty does not apply
    far = generate(tenant, logits, temperature=0, prompt=(7, 1, 2), repeat_penalty=1.1,
                   repeat_window=2)
    assert far.tokens == [7]


def test_generated_tokens_enter_the_penalty_window(tenant: Tenant) -> None:
    logits = peaked_logits()
    logits[3] = 2.95
    host = generate(tenant, logits, temperature=0, max_tokens=2, repeat_penalty=1.1)
    assert host.tokens == [7, 3]


def test_eos_id_stops_generation(tenant: Tenant) -> None:
    host = generate(tenant, peaked_logits(), temperature=0, max_tokens=10, eos_ids=[7])
    assert host.tokens == [7]
    assert host.forwards == [[1, 2]]  # the prompt only: nothing after the end token


def test_emit_answering_stop_ends_generation(tenant: Tenant) -> None:
    host = generate(tenant, peaked_logits(), temperature=0, max_tokens=10, stop_after=3)
    assert host.tokens == [7, 7, 7]
    assert len(host.forwards) == 3


def test_max_tokens_and_no_forward_after_the_last_token(tenant: Tenant) -> None:
    host = generate(tenant, peaked_logits(), temperature=0, max_tokens=4, prompt=(5, 6, 7))
    assert host.tokens == [7, 7, 7, 7]
    assert host.forwards == [[5, 6, 7], [7], [7], [7]]
    empty = generate(tenant, peaked_logits(), max_tokens=0)
    assert empty.tokens == []
    assert empty.forwards == [[1, 2]]


def test_empirical_distribution_matches_softmax(tenant: Tenant) -> None:
    logits = np.array([0.0, 0.5, 1.0, -1.0, 2.0, 0.2, -0.5, 1.5], np.float32)
    n = 6000
    tokens = generate(tenant, logits, temperature=1.0, max_tokens=n, seed=10).tokens
    empirical = np.bincount(tokens, minlength=len(logits)) / n
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    assert np.abs(empirical - expected).max() < 0.025


def test_stats_count_tokens_requests_and_fuel() -> None:
    fresh = Tenant("counted")
    generate(fresh, peaked_logits(), temperature=0, max_tokens=5)
    generate(fresh, peaked_logits(), temperature=0, max_tokens=3)
    stats = fresh.stats()
    assert stats["id"] == "counted"
    assert stats["state"] == "idle"
    assert stats["tokens"] == 8
    assert stats["requests"] == 2
    assert stats["fuel_used"] > 8 * V  # every token scans the vocabulary
    assert 0 < stats["memory_bytes"] <= fresh.memory_limit_bytes


# --- tiny and huge temperatures (issue 10, item 8) ---------------------------------------------

F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
F32_MIN_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)  # 1.4e-45


@pytest.mark.parametrize("temperature", [1e-39, F32_MIN_SUBNORMAL, F32_MIN_NORMAL, 1e-30, 1e-20])
def test_a_tiny_temperature_is_greedy(tenant: Tenant, temperature: float) -> None:
    # 1 / 1e-39 overflowed to inf, 0 * inf made the best candidate's weight NaN, and the draw
    # fell through to the worst kept candidate
    logits = peaked_logits()
    logits[3] = np.nextafter(np.float32(3.0), np.float32(0))  # a near tie just below the best
    host = generate(tenant, logits, temperature=temperature, max_tokens=40, seed=13)
    assert host.tokens == [7] * 40


def test_a_tiny_temperature_shares_the_draw_between_exact_ties(tenant: Tenant) -> None:
    logits = peaked_logits()
    logits[[3, 7]] = 3.0  # two best, exactly tied
    drawn = Counter(generate(tenant, logits, temperature=1e-39, max_tokens=200, seed=14).tokens)
    assert set(drawn) == {3, 7}
    assert min(drawn.values()) > 60  # about half each


def test_a_huge_temperature_flattens_the_kept_candidates(tenant: Tenant) -> None:
    logits = peaked_logits()
    drawn = Counter(generate(tenant, logits, temperature=100.0, top_k=5, max_tokens=500,
                             seed=15).tokens)
    assert set(drawn) == {7, 3, 500, 42, 999}
    assert max(drawn.values()) < 150  # near uniform: 100 each
