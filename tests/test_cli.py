"""The `realm-nb` command line: help, generate (local and --endpoint), models, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from realm_nb.cli import build_parser, main

COMMANDS = ("pull", "models", "generate", "chat", "serve", "bench", "build-guest")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.pop("REALM_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "realm_nb", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_entry_point_help() -> None:
    exe = shutil.which("realm-nb")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "realm_nb", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: realm-nb " + command in capsys.readouterr().out


def test_generating_commands_take_endpoint() -> None:
    parser = build_parser()
    for command in ("models", "generate", "chat", "bench"):
        argv = [command, "--endpoint", "http://127.0.0.1:1"] + (["hi"] if command == "generate"
                                                                 else [])
        assert parser.parse_args(argv).endpoint == "http://127.0.0.1:1"


@pytest.mark.slow
def test_generate_prints_text_and_summary(smollm2_path) -> None:
    proc = run_cli("generate", "The capital of France is", "-n", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    summary = proc.stderr.strip().splitlines()[-1]
    assert "8 tokens" in summary and "tok/s" in summary and "finish: length" in summary


@pytest.mark.slow
def test_chat_from_a_pipe_answers_each_line_without_prompts(smollm2_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "realm_nb", "chat", "-n", "6", "--temperature", "0"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "you>" not in proc.stdout and "model>" not in proc.stdout
    assert proc.stdout.strip()  # the model's answer


@pytest.mark.slow
def test_generate_reads_the_prompt_from_stdin_without_its_newline(smollm2_path) -> None:
    args = ["-n", "6", "--temperature", "0"]
    direct = run_cli("generate", "The capital of France is", *args)
    piped = subprocess.run([sys.executable, "-m", "realm_nb", "generate", "-", *args],
                           input="The capital of France is\n", capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout


@pytest.mark.slow
def test_models_json(smollm2_path) -> None:
    proc = run_cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = {r["name"] for r in rows}
    assert "smollm2-135m" in names
    assert {"id", "name", "path", "arch", "quant", "size_bytes", "loaded"} <= set(rows[0])


def test_unknown_model_exits_2_with_one_line() -> None:
    proc = run_cli("generate", "hi", "-m", "no-such-model-anywhere")
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("realm-nb: error:")
    assert "no-such-model-anywhere" in lines[0]


def test_bad_sampling_flag_fails_before_any_model_loads() -> None:
    proc = run_cli("generate", "hi", "-n", "-1", "-m", "no-such-model-anywhere")
    assert proc.returncode == 2
    assert "max_tokens=-1" in proc.stderr and "no-such-model" not in proc.stderr


def test_unreachable_endpoint_exits_2() -> None:
    proc = run_cli("models", "--endpoint", "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "http://127.0.0.1:9" in proc.stderr


@pytest.mark.slow
def test_generate_through_endpoint(kernel, capsys: pytest.CaptureFixture[str]) -> None:
    from realm_nb import Realm
    from realm_nb.server import BackgroundServer, create_app

    want = Realm(mode="local").generate("The capital of France is", max_tokens=6,
                                        temperature=0)
    with BackgroundServer(create_app(kernel)) as srv:
        code = main(["generate", "The capital of France is", "-n", "6", "--temperature", "0",
                     "--endpoint", srv.url])
        out = capsys.readouterr()
        assert code == 0
        assert out.out == want.text + "\n"
        assert "6 tokens" in out.err
        assert main(["models", "--json", "--endpoint", srv.url]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert any(r["name"] == "smollm2-135m" and r["loaded"] for r in rows)


@pytest.mark.slow
def test_serve_prints_url_and_answers(smollm2_path, tmp_path) -> None:
    import socket
    import time

    import httpx

    keys = tmp_path / "keys.toml"
    keys.write_text('[keys."sk-alice"]\ntenant = "alice"\nrate = 50.0\nburst = 5\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm_nb", "serve", "--port", str(port), "--api-keys", str(keys),
         "--models-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer sk-alice"},
                       json={"prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"{url}/v1" in err
