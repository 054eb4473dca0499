"""`RealmPanel` from Python: traits, the worker thread, Stop, and the {id, action} protocol.

The browser side is in test_browser.py; here the front end's messages are sent to `_on_msg`
directly and the replies caught from `send`.
"""

from __future__ import annotations

import time

import pytest

from realm_nb.types import SamplingParams
from realm_nb.widget import STATIC, RealmPanel

pytestmark = pytest.mark.slow  # the panel generates with the real SmolLM2 (the shared kernel)


@pytest.fixture()
def panel(kernel):
    p = RealmPanel()
    p.sent = []
    p.send = lambda content, buffers=None: p.sent.append(content)  # what the page would get
    yield p
    p.stop()
    p.wait(30)
    p.close()


def front_end(panel: RealmPanel, **content):
    """Send one front-end request and return the reply with its id."""
    panel._on_msg(panel, content, [])
    replies = [m for m in panel.sent if m.get("id") == content.get("id")]
    return replies[-1] if replies else None


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_esm_and_css_are_real_files():
    js = (STATIC / "panel.js").read_text()
    assert str(RealmPanel._esm) == js, "the ESM is read from static/panel.js"
    assert str(RealmPanel._css) == (STATIC / "panel.css").read_text()
    for trait in ("models", "model", "prompt", "temperature", "max_tokens", "top_k", "top_p",
                  "min_p", "repeat_penalty", "stop_strings", "seed_text", "last_seed",
                  "show_probs", "probs", "text", "status", "tokens", "tok_s", "error",
                  "running"):
        assert trait in js, f"the ESM does not show {trait}"
        assert RealmPanel.class_traits()[trait].metadata.get("sync"), trait


def test_picker_lists_the_registry_with_aliases(panel):
    names = [m["name"] for m in panel.models]
    assert "smollm2-135m" in names and "smollm2" in names
    assert panel.model == "smollm2-135m"


def test_generate_streams_from_a_worker_thread_and_matches_the_sdk(panel):
    from realm_nb import Realm

    seen = []
    panel.observe(lambda change: seen.append(change["new"]), "text")
    panel.generate("Once upon a time, a cat named Tom", max_tokens=24, temperature=0.7, seed=9)
    assert panel.running
    g = panel.wait(120)
    assert g is not None and panel.status == "done" and not panel.running
    sdk = Realm(mode="local").generate("Once upon a time, a cat named Tom", max_tokens=24,
                                       temperature=0.7, seed=9, top_p=0.95)
    assert panel.text == g.text == sdk.text
    assert panel.tokens == 24 and panel.tok_s > 0
    assert len(seen) >= 2, "the text should arrive in several updates"


def test_stop_halts_a_running_generation_and_keeps_the_text(panel):
    panel.generate("Count from one to one thousand: one, two, three,", max_tokens=1500,
                   temperature=0)
    assert wait_for(lambda: panel.tokens >= 3)
    reply = front_end(panel, id="s1", action="stop")
    assert reply == {"id": "s1", "ok": True}
    g = panel.wait(60)
    assert g is not None and g.finish_reason == "cancelled"
    assert panel.status == "stopped" and not panel.running
    assert 0 < panel.tokens < 1500 and panel.text == g.text


def test_every_front_end_request_gets_a_reply(panel):
    assert front_end(panel, id=1, action="refresh") == {"id": 1, "ok": True}
    bad = front_end(panel, id=2, action="explode")
    assert bad["ok"] is False and "unknown action" in bad["error"]
    empty = front_end(panel, id=3, action="load", path="  ")
    assert empty["ok"] is False and empty["error"]
    panel.prompt = ""
    nothing = front_end(panel, id=4, action="generate")
    assert nothing["ok"] is False and "prompt" in nothing["error"]
    assert panel.error == nothing["error"], "errors are shown in the panel"
    assert front_end(panel, id=5, action="stop") == {"id": 5, "ok": True}


def test_generate_while_running_is_refused_with_a_reply(panel):
    panel.max_tokens = 1500
    ok = front_end(panel, id="g1", action="generate", prompt="Count: one, two, three,")
    assert ok == {"id": "g1", "ok": True}
    again = front_end(panel, id="g2", action="generate")
    assert again["ok"] is False and "already running" in again["error"]
    panel.stop()
    panel.wait(60)


def test_load_replies_when_the_model_is_loaded(panel, smollm2_path):
    panel._on_msg(panel, {"id": "l1", "action": "load", "path": str(smollm2_path),
                          "name": "panel-smol"}, [])
    assert wait_for(lambda: any(m.get("id") == "l1" for m in panel.sent), 120)
    assert front_end(panel, id="x", action="refresh")["ok"]
    assert next(m for m in panel.sent if m.get("id") == "l1") == {"id": "l1", "ok": True}
    assert panel.model == "panel-smol"
    assert "panel-smol" in [m["name"] for m in panel.models]


def test_a_bad_model_shows_the_error_in_the_panel(panel):
    panel.model = "no-such-model"
    panel.generate("Hello", max_tokens=2)
    panel.wait(60)
    assert panel.status == "error" and "no-such-model" in panel.error and not panel.running


def test_bad_parameters_are_refused_before_starting(panel):
    reply = front_end(panel, id=7, action="generate", prompt="Hi")
    assert reply["ok"]
    panel.wait(60)
    panel.top_p = 3.0
    reply = front_end(panel, id=8, action="generate", prompt="Hi")
    assert reply["ok"] is False and "top_p" in reply["error"] and not panel.running


def test_defaults_are_the_sampling_defaults_of_the_magics():
    from realm_nb.magics import RealmMagics

    d = SamplingParams()
    for key in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty"):
        panel_default = RealmPanel.class_traits()[key].default_value
        magic_default = RealmMagics.class_traits()[key].default_value
        assert panel_default == magic_default == getattr(d, key), key


def test_new_parameters_reach_the_generation(panel):
    panel.generate("Name three colours:", max_tokens=4, temperature=0.7, seed=3, top_k=5,
                   min_p=0.1, repeat_penalty=1.2, stop="\n\n")
    g = panel.wait(120)
    assert g is not None and g.params is not None
    assert (g.params.top_k, g.params.min_p, g.params.repeat_penalty, g.params.stop) == \
        (5, 0.1, 1.2, ("\n\n",))
    assert panel.stop_strings == ["\n\n"]


def test_probabilities_come_from_logprobs(panel):
    panel.generate("The capital of France is", max_tokens=6, temperature=0)
    g = panel.wait(120)
    assert g is not None and g.logprobs is not None
    assert len(panel.probs) == len(g.token_ids) == panel.tokens
    for row, lp in zip(panel.probs, g.logprobs, strict=True):
        assert row["t"] == lp.token and 0 < row["p"] <= 1
        assert len(row["top"]) == 5
        assert row["top"][0]["t"] == row["t"], "greedy: the chosen token is the likeliest"
        ps = [alt["p"] for alt in row["top"]]
        assert ps == sorted(ps, reverse=True)


def test_seed_is_exact_as_text_and_the_last_seed_reproduces(panel):
    panel.seed = 2**64 - 1
    assert panel.seed_text == str(2**64 - 1)  # the page edits this string: no double rounding
    panel.seed_text = "123"
    assert panel.seed == 123
    panel.seed_text = ""
    assert panel.seed is None
    panel.generate("Write a line about rain:", max_tokens=8, temperature=1.0)
    first = panel.wait(120)
    assert first is not None and first.params is not None
    assert panel.last_seed == str(first.params.seed)
    panel.seed_text = panel.last_seed
    panel.generate()
    again = panel.wait(120)
    assert again is not None and again.text == first.text


def test_picker_marks_models_loaded_and_refreshes_after_a_generation(panel):
    loaded = {m.name: m.loaded for m in panel.realm.models()}
    for row in panel.models:
        state = "loaded" if row["loaded"] else "not loaded"
        assert row["label"].endswith(f"{state})"), row
    assert loaded["smollm2-135m"] and next(r for r in panel.models
                                           if r["name"] == "smollm2-135m")["loaded"]
    panel.models = []  # stale: the worker rereads the registry when the model answers
    panel.generate("Hi", max_tokens=2, temperature=0)
    panel.wait(120)
    assert wait_for(lambda: len(panel.models) > 0, 10)
