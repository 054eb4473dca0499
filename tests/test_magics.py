"""`%load_ext realm_nb`, the `%realm` verbs and `%%realm generate`, in an in-process IPython shell.

Generation uses the real SmolLM2 model through the process-wide kernel, like SDK local mode.
"""

from __future__ import annotations

import _thread
import html
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

from realm_nb.cell_output import code_cell, code_of
from realm_nb.magics import RealmMagics, interpolate, unescape_stop

# the magics generate with the real SmolLM2 (the shared kernel); the few pure helpers
# tested here ride along
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ip(kernel):
    shell = start_ipython()
    shell.run_line_magic("load_ext", "realm_nb")
    yield shell
    shell.run_line_magic("unload_ext", "realm_nb")


def magics(shell) -> RealmMagics:
    return next(c for c in shell.configurables if isinstance(c, RealmMagics))


def gen(shell, line: str, cell: str):
    """Run `%%realm generate LINE` and return the captured outputs."""
    with capture_output() as cap:
        shell.run_cell_magic("realm", f"generate {line}", cell)
    return cap


def final(cap):
    assert cap.outputs, f"no display output; stdout={cap.stdout!r}"
    return cap.outputs[-1]


# ----------------------------------------------------------------------------- the extension


def test_import_and_load_ext_do_not_import_jax_or_wasmtime():
    code = ("import sys, realm_nb, realm_nb.magics\n"
            "from IPython.testing.globalipapp import start_ipython\n"
            "ip = start_ipython(); ip.run_line_magic('load_ext', 'realm_nb')\n"
            "print(sorted(m for m in ('jax', 'jaxlib', 'wasmtime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unload_ext_removes_the_magics_and_load_brings_them_back(ip):
    ip.run_line_magic("unload_ext", "realm_nb")
    assert "realm" not in ip.magics_manager.magics["line"]
    assert "realm" not in ip.magics_manager.magics["cell"]
    assert not any(isinstance(c, RealmMagics) for c in ip.configurables)
    ip.run_line_magic("load_ext", "realm_nb")
    assert "realm" in ip.magics_manager.magics["line"]
    assert "realm" in ip.magics_manager.magics["cell"]


def test_config_sets_the_default_model(ip):
    ip.run_line_magic("config", 'RealmMagics.default_model = "smollm2"')
    try:
        assert magics(ip).default_model == "smollm2"
        cap = gen(ip, "-n 2 --seed 1", "Hello")
        assert final(cap).metadata["realm_nb"]["model"] == "smollm2-135m"
    finally:
        ip.run_line_magic("config", 'RealmMagics.default_model = "smollm2-135m"')


# ----------------------------------------------------------------------------- line verbs


def test_help_lists_every_verb_with_a_one_line_description(ip):
    with capture_output() as cap:
        ip.run_line_magic("realm", "help")
    lines = cap.stdout.splitlines()
    for verb in ("help", "list", "use", "load", "unload", "pull", "connect", "disconnect",
                 "status", "panel", "generate", "chat"):
        line = next((x for x in lines if x.split()[1:2] == [verb]), None)
        assert line is not None, f"{verb} missing from {cap.stdout}"
        assert len(line.split()) > 3, f"{verb} has no description: {line!r}"
    assert any(x.split()[:2] == ["%%realm", "chat"] for x in lines)
    with capture_output() as cap:
        ip.run_line_magic("realm", "help generate")
    assert "--max-tokens" in cap.stdout


def test_list_shows_the_catalogue_model(ip):
    with capture_output() as cap:
        ip.run_line_magic("realm", "list")
    assert "smollm2-135m" in cap.stdout


def test_use_sets_the_default_and_rejects_unknown_names(ip):
    with capture_output():
        ip.run_line_magic("realm", "use smollm2")
    assert magics(ip).default_model == "smollm2"
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        ip.run_line_magic("realm", "use nope")
    with capture_output():
        ip.run_line_magic("realm", "use smollm2-135m")


def test_pull_prints_the_cached_path(ip, smollm2_path):
    with capture_output() as cap:
        ip.run_line_magic("realm", "pull smollm2-135m")
    assert cap.stdout.strip() == str(smollm2_path)


def test_load_a_path_under_a_name_then_unload(ip, smollm2_path):
    with capture_output() as cap:
        ip.run_line_magic("realm", f"load {smollm2_path} --name my-smol")
    assert "loaded my-smol" in cap.stdout
    names = {n for m in magics(ip).client.models() for n in (m.name, *m.aliases)}
    assert "my-smol" in names
    with capture_output() as cap:
        ip.run_line_magic("realm", "unload smollm2-135m")
    assert "unloaded smollm2-135m" in cap.stdout
    assert not any(m.loaded for m in magics(ip).client.models() if m.name == "smollm2-135m")
    with capture_output():
        ip.run_line_magic("realm", "load smollm2-135m")
    assert any(m.loaded for m in magics(ip).client.models() if m.name == "smollm2-135m")


def test_status_reports_mode_and_model(ip):
    with capture_output() as cap:
        ip.run_line_magic("realm", "status")
    assert "local mode" in cap.stdout and "smollm2-135m" in cap.stdout


def test_panel_returns_a_realm_panel_on_the_same_client(ip):
    from realm_nb.widget import RealmPanel

    panel = ip.run_line_magic("realm", "panel")
    assert isinstance(panel, RealmPanel)
    assert panel.realm is magics(ip).client
    assert panel.model == "smollm2-135m"
    panel.close()


def test_connect_to_nothing_is_a_usage_error_and_keeps_local_mode(ip):
    with pytest.raises(UsageError):
        ip.run_line_magic("realm", "connect http://127.0.0.1:9")
    assert magics(ip).client.mode == "local"
    with pytest.raises(UsageError, match="not connected"):
        ip.run_line_magic("realm", "disconnect")


@pytest.mark.parametrize("line", [
    "bogus", "list --verbose", "use", "load", "connect", "generate",
])
def test_bad_line_usage_is_a_one_line_usage_error(ip, line):
    with pytest.raises(UsageError) as err:
        ip.run_line_magic("realm", line)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line", [
    "-n many", "--top-k x", "-f pdf", "--bogus", "-t -1", "--top-p 3", "-o 1x",
])
def test_bad_generate_flags_are_one_line_usage_errors(ip, line):
    with pytest.raises(UsageError) as err:
        ip.run_cell_magic("realm", f"generate {line}", "Hello")
    assert "\n" not in str(err.value)


def test_empty_cell_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="empty"):
        ip.run_cell_magic("realm", "generate", "\n  \n")


# ----------------------------------------------------------------------------- generate


def test_generate_output_equals_the_sdk_for_the_same_seed(ip):
    from realm_nb import Realm

    prompt = "The capital of France is"
    sdk = Realm(mode="local").generate(prompt, max_tokens=12, temperature=0.8, seed=11)
    cap = gen(ip, "-n 12 -t 0.8 --seed 11 -o g", prompt)
    out = final(cap)
    assert out.data["text/plain"] == sdk.text
    assert ip.user_ns["g"].token_ids == sdk.token_ids


def test_every_output_carries_its_metadata(ip):
    cap = gen(ip, "-n 6 -t 0.5 --seed 4", "Once upon a time")
    meta = final(cap).metadata["realm_nb"]
    assert meta["model"] == "smollm2-135m"
    assert meta["seed"] == meta["params"]["seed"] == "4"  # a string: exact through JSON/JS
    assert meta["params"]["temperature"] == 0.5 and meta["params"]["max_tokens"] == 6
    assert meta["tokens"] == 6 and meta["tok_s"] > 0
    assert "6 tokens" in final(cap).data["text/html"]


def test_o_stores_the_generation(ip):
    gen(ip, "-n 5 --seed 2 -o result", "Tell me a fact:")
    g = ip.user_ns["result"]
    assert g.prompt == "Tell me a fact:"
    assert len(g.token_ids) == 5 and g.finish_reason == "length"
    assert g.usage["completion_tokens"] == 5
    assert {"ttft_ms", "tokens_per_s"} <= set(g.timings)


def test_streaming_updates_one_handle_at_most_ten_times_a_second(ip):
    t0 = time.monotonic()
    cap = gen(ip, "-n 40 -t 0.7 --seed 5", "Once upon a time, a cat named Tom")
    elapsed = time.monotonic() - t0
    n_outputs = len(cap.outputs)
    assert n_outputs >= 2, "expected a live display and a final render"
    assert n_outputs <= elapsed * 10 + 2
    assert all(o.update for o in cap.outputs[1:]), "later outputs update the same handle"


def test_no_stream_renders_the_text_once(ip):
    cap = gen(ip, "-n 8 --seed 5 --no-stream", "Hello")
    outputs = cap.outputs
    texts = [i for i, o in enumerate(outputs) if "realm-progress" not in o.data["text/html"]]
    assert texts == [len(outputs) - 1], "status lines, then the text once, at the end"


def test_a_status_line_shows_before_the_first_token(ip):
    cap = gen(ip, "-n 2 --seed 5", "Hello")
    first = cap.outputs[0]
    assert "realm-progress" in first.data["text/html"]
    assert first.data["text/plain"].startswith("realm-nb: starting ")
    assert all(o.update for o in cap.outputs[1:]), "the text replaces the status line"


def test_interpolation_fills_names_and_keeps_other_braces(ip):
    ip.user_ns["x"] = "Lyon"
    cell = "City: {x}\nsquares = {k: k ** 2 for k in range(3)}\nJSON {\"a\": 1} and $\\frac{1}{2}$"
    gen(ip, "-n 1 --seed 1 -o g", cell)
    prompt = ip.user_ns["g"].prompt
    assert prompt.startswith("City: Lyon\n")
    assert "{k: k ** 2 for k in range(3)}" in prompt
    assert '{"a": 1}' in prompt and "\\frac{1}{2}" in prompt
    gen(ip, "-n 1 --seed 1 -o g --no-interpolate", cell)
    assert ip.user_ns["g"].prompt.startswith("City: {x}\n")


def test_interpolate_history_and_missing_names():
    ns = {"In": ["", "a = 1", "a + 1"], "Out": {2: 2}, "name": "N"}
    assert interpolate("{In[1]} | {Out[2]} | {name}", ns) == "a = 1 | 2 | N"
    kept = "{In[9]} {Out[7]} {missing} {{name}} f'{name!r}' {name.upper()} {x for x in y}"
    missing: list[str] = []
    assert interpolate(kept + " {missing}", ns, missing) == kept + " {missing}"
    assert missing == ["missing"], "each unknown {identifier} once"


def test_an_undefined_name_gets_a_one_line_warning(ip):
    ip.user_ns["topic"] = "tea"
    ip.user_ns.pop("tpoic", None)
    cap = gen(ip, "-n 1 --seed 1 -o g", "Tell me about {tpoic} and {topic}.")
    warning = [line for line in cap.stderr.splitlines() if "tpoic" in line]
    assert len(warning) == 1 and "not defined" in warning[0], cap.stderr
    assert ip.user_ns["g"].prompt == "Tell me about {tpoic} and tea."
    cap = gen(ip, "-n 1 --seed 1 --no-interpolate", "Tell me about {tpoic}.")
    assert "tpoic" not in cap.stderr


def test_chat_applies_the_chat_template(ip):
    gen(ip, "--chat -n 4 --seed 1 -o g", "Hi!")
    assert "<|im_start|>user\nHi!<|im_end|>" in ip.user_ns["g"].prompt


def chat(shell, line: str, cell: str):
    with capture_output() as cap:
        shell.run_cell_magic("realm", f"chat {line}", cell)
    return cap


def test_chat_keeps_a_conversation_per_notebook(ip):
    with capture_output():
        ip.run_line_magic("realm", "chat reset")
    chat(ip, "--system 'You are terse.' -n 6 -t 0 -o c1", "My name is Ada.")
    first = ip.user_ns["c1"]
    assert first.text
    cap = chat(ip, "-n 6 -t 0 -o c2", "What is my name?")
    prompt = ip.user_ns["c2"].prompt
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt
    assert "<|im_start|>user\nMy name is Ada.<|im_end|>" in prompt
    assert f"<|im_start|>assistant\n{first.text.strip()}" in prompt, "the reply is history"
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert final(cap).metadata["realm_nb"]["chat_turn"] == 2
    assert "chat turn 2" in final(cap).data["text/html"]
    with capture_output() as cap:
        ip.run_line_magic("realm", "chat history")
    assert "[system] You are terse." in cap.stdout
    assert "[1 user] My name is Ada." in cap.stdout and "[2 user] What is my name?" in cap.stdout
    # --chat on generate stays one turn: none of the conversation goes with it
    gen(ip, "--chat -n 2 -t 0 -o g", "Hello")
    assert "Ada" not in ip.user_ns["g"].prompt and "terse" not in ip.user_ns["g"].prompt
    with capture_output() as cap:
        ip.run_line_magic("realm", "chat reset")
    assert "new conversation" in cap.stdout
    chat(ip, "-n 2 -t 0 -o c3", "Hi")
    assert "Ada" not in ip.user_ns["c3"].prompt and "terse" not in ip.user_ns["c3"].prompt
    with capture_output():
        ip.run_line_magic("realm", "chat reset")


@pytest.mark.parametrize(("line", "cell"), [("chat", None), ("chat history", "Hi"),
                                            ("chat bogus", None)])
def test_chat_misuse_is_a_one_line_usage_error(ip, line, cell):
    with pytest.raises(UsageError) as err:
        if cell is None:
            ip.run_line_magic("realm", line)
        else:
            ip.run_cell_magic("realm", line, cell)
    assert "\n" not in str(err.value)


def test_markdown_and_code_formats(ip, monkeypatch):
    cap = gen(ip, "-f markdown -n 4 --seed 1", "# Title")
    assert "text/markdown" in final(cap).data
    inserted = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False:
                        inserted.append((text, replace)))
    cap = gen(ip, "-f code -n 12 -t 0 -o g", "def add(a, b):")
    assert "text/html" in final(cap).data
    assert inserted and inserted[-1][1] is False, "-f code inserts a new cell below"
    g = ip.user_ns["g"]
    # a completion goes on from the prompt: the new cell holds the def line and its body
    assert inserted[-1][0] == code_of("def add(a, b):" + g.text)
    assert inserted[-1][0].startswith("def add(a, b):") and len(inserted[-1][0]) > 15
    assert final(cap).metadata["realm_nb"]["continuation"] is True
    shown = html.unescape(re.sub(r"<[^>]+>", "", final(cap).data["text/html"]))
    assert "def add(a, b):" in shown, "the cell shows what it inserts"
    if g.finish_reason == "length":
        assert "cut at the token limit, -n 12" in final(cap).data["text/html"]


def test_code_from_a_chat_reply_is_the_reply_alone(ip, monkeypatch):
    inserted = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False: inserted.append(text))
    cap = gen(ip, "--chat -f code -n 6 -t 0 -o g", "Write x = 1 in Python.")
    assert inserted == [code_of(ip.user_ns["g"].text)]
    assert final(cap).metadata["realm_nb"]["continuation"] is False


def test_footer_says_when_the_token_limit_cut_the_text(ip):
    cap = gen(ip, "-n 3 -t 0 -o g", "Once upon a time")
    assert ip.user_ns["g"].finish_reason == "length"
    assert "finish: length (the text was cut at the token limit, -n 3)" in \
        final(cap).data["text/html"]


def test_output_wraps_at_words_with_no_indent_or_blank_first_line(ip):
    cap = gen(ip, "-n 6 -t 0 -o g", "The capital of France is")
    html_out = final(cap).data["text/html"]
    g = ip.user_ns["g"]
    assert "<pre" not in html_out, "JupyterLab gives output <pre> word-break: break-all"
    style = html_out.split('style="', 1)[1].split('"', 1)[0]
    assert "white-space:pre-wrap" in style and "word-break:normal" in style
    assert "break-all" not in html_out
    shown = html_out.split(">", 1)[1].split("</div>", 1)[0]
    assert shown == html.escape(g.text.lstrip()) and not shown[:1].isspace()
    assert final(cap).data["text/plain"] == g.text, "text/plain keeps the text exactly"
    live = next(o for o in cap.outputs if "realm-live" in o.data.get("text/html", ""))
    assert "<pre" not in live.data["text/html"]


def test_the_seed_in_the_output_metadata_reproduces_the_text(ip):
    """A drawn seed is a u64; stored as a string, it survives a front end that reads JSON
    numbers as doubles (JupyterLab's notebook model), and gives the same text again."""
    cap = gen(ip, "-n 12 -t 1.0 -o g", "Write a sentence about the sea:")
    first = ip.user_ns["g"]
    out = final(cap)
    # what JupyterLab saves: the metadata through JSON, numbers read as doubles
    saved = json.loads(json.dumps(out.metadata), parse_int=float)["realm_nb"]
    assert saved["seed"] == str(first.params.seed)
    assert f"seed {saved['seed']} " in out.data["text/html"], "the footer shows the same seed"
    cap = gen(ip, f"-n 12 -t 1.0 --seed {saved['seed']} -o g", "Write a sentence about the sea:")
    assert ip.user_ns["g"].text == first.text and ip.user_ns["g"].token_ids == first.token_ids
    assert final(cap).metadata["realm_nb"]["seed"] == saved["seed"]


def test_a_large_seed_stays_exact(ip):
    big = 2**64 - 3  # past 2**53: a double would round it
    cap = gen(ip, f"-n 2 --seed {big}", "Hi")
    assert final(cap).metadata["realm_nb"]["seed"] == str(big)
    assert f"seed {big}" in final(cap).data["text/html"]


def test_sampling_flags_reach_the_guest_with_the_panels_defaults(ip):
    from realm_nb.types import SamplingParams
    from realm_nb.widget import RealmPanel

    gen(ip, "-n 2 --seed 1 -o g", "Hi")
    p = ip.user_ns["g"].params
    d = SamplingParams()
    for key in ("top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "temperature"):
        if key != "max_tokens":
            assert getattr(p, key) == getattr(d, key), key
        assert getattr(magics(ip), key) == getattr(d, key) == \
            RealmPanel.class_traits()[key].default_value, key
    gen(ip, "-n 2 --seed 1 --top-k 5 --top-p 0.9 --min-p 0.1 --repeat-penalty 1.2 "
        "--stop '.' --stop 'END' -o g", "Hi")
    p = ip.user_ns["g"].params
    assert (p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.stop) == (5, 0.9, 0.1, 1.2,
                                                                     (".", "END"))


def test_code_of_takes_the_first_fenced_block():
    assert code_of("Here:\n```python\nx = 1\n```\nDone") == "x = 1"
    assert code_of("x = 2\n") == "x = 2"


def test_code_cell_continues_the_prompts_code():
    from realm_nb.types import Generation

    def g(prompt: str, text: str) -> Generation:
        return Generation(text=text, token_ids=[], prompt=prompt, prompt_ids=[],
                          finish_reason="length", model="m")

    body = "\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    assert code_cell(g("def fib(n):", body), True) == ("def fib(n):" + body).strip("\n")
    # the model closes the block it was never given an opening for: the code stops there
    assert code_cell(g("def fib(n):", body + "```\n\nThis computes"), True) == \
        ("def fib(n):" + body).strip("\n")
    # a completion that opens a block of its own: that block, even when cut
    assert code_cell(g("Add two numbers:", "\n```python\ndef add(a, b):\n    ret"), True) == \
        "def add(a, b):\n    ret"
    assert code_cell(g("```python\ndef f():", "\n    return 1\n```\nok"), True) == \
        "def f():\n    return 1"
    assert code_cell(g("Write x:", "Here:\n```python\nx = 1\n```"), False) == "x = 1"


def test_stop_strings_take_escapes(ip):
    gen(ip, "-n 40 --seed 3 --stop '\\n' -o g", "List three colours:")
    assert ip.user_ns["g"].params.stop == ("\n",)


def test_kernel_interrupt_stops_and_keeps_the_partial_text(ip):
    from realm_nb.kernel import RealmKernel

    kernel = RealmKernel.shared()

    def interrupt_mid_generation() -> None:
        deadline = time.monotonic() + 60
        while not kernel.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_mid_generation, daemon=True).start()
    cap = gen(ip, "-n 1500 -t 0 -o g", "Count from one to one thousand: one, two, three,")
    g = ip.user_ns["g"]
    assert g.finish_reason == "cancelled"
    assert 0 < len(g.token_ids) < 1500
    out = final(cap)
    assert out.data["text/plain"] == g.text and g.text
    assert "interrupted" in out.data["text/html"]


def test_stop_escapes_decode_and_non_ascii_stays_as_typed() -> None:
    assert unescape_stop("\\n\\n") == "\n\n"
    assert unescape_stop("\\u2026") == "\u2026"
    assert unescape_stop("é") == "é"  # was "Ã©": unicode_escape read the text as latin-1
    assert unescape_stop("😀 end") == "😀 end"
    assert unescape_stop("a\\\\b") == "a\\b"


def test_broken_stop_escape_is_a_usage_error(ip) -> None:
    with pytest.raises(UsageError, match="--stop"):
        gen(ip, "-n 2 --stop 'a\\'", "Hello")
