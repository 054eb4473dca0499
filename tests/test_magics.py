"""`%load_ext realm_nb`, the `%realm` verbs and `%%realm generate`, in an in-process IPython shell.

Generation uses the real SmolLM2 model through the process-wide kernel, like SDK local mode.
"""

from __future__ import annotations

import _thread
import subprocess
import sys
import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

from realm_nb.magics import RealmMagics, code_of, interpolate, unescape_stop


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


def test_help_lists_every_verb(ip):
    with capture_output() as cap:
        ip.run_line_magic("realm", "help")
    for verb in ("list", "use", "load", "unload", "pull", "connect", "disconnect", "status",
                 "panel", "generate"):
        assert verb in cap.stdout
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
    assert meta["seed"] == 4
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
    assert interpolate(kept, ns) == kept


def test_chat_applies_the_chat_template(ip):
    gen(ip, "--chat -n 4 --seed 1 -o g", "Hi!")
    assert "<|im_start|>user\nHi!<|im_end|>" in ip.user_ns["g"].prompt


def test_markdown_and_code_formats(ip, monkeypatch):
    cap = gen(ip, "-f markdown -n 4 --seed 1", "# Title")
    assert "text/markdown" in final(cap).data
    inserted = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False:
                        inserted.append((text, replace)))
    cap = gen(ip, "-f code -n 12 -t 0 -o g", "def add(a, b):")
    assert "text/html" in final(cap).data
    assert inserted and inserted[-1][1] is False, "-f code inserts a new cell below"
    assert inserted[-1][0] == code_of(ip.user_ns["g"].text)


def test_code_of_takes_the_first_fenced_block():
    assert code_of("Here:\n```python\nx = 1\n```\nDone") == "x = 1"
    assert code_of("x = 2\n") == "x = 2"


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
