"""`xpuserve serve` and `xpuserve chat` as real subprocesses: start-up, graceful shutdown, refusals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_fixture import CHAT_PROMPT, THINK_AFTER, free_port
from xpuserve import LLM, SamplingParams
from xpuserve.reasoning import split_reasoning


def start_server(model_dir, *extra: str, env: dict | None = None, wait_s: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xpuserve", "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
         "--device", "cpu", "--served-model-name", "m", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()}")


def test_serve_answers_then_shuts_down_gracefully_on_sigterm(model_dir):
    proc, url = start_server(model_dir, env={"RANK": "3"})  # a scheduler's stray RANK, no torchrun: serve anyway
    try:
        reply = httpx.post(url + "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": CHAT_PROMPT}], "temperature": 0, "max_tokens": 8}).json()
        assert len(reply["choices"][0]["message"]["reasoning_content"]) == THINK_AFTER
        lines: list[str] = []

        def stream():  # a long request in flight while the server is told to stop
            body = {"model": "m", "prompt": "ab", "max_tokens": 400, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                    lines.extend(line for line in response.iter_lines() if line)
            except httpx.HTTPError:
                pass

        client = threading.Thread(target=stream)
        client.start()
        while not lines:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        client.join(30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "serving m on cpu (float32)" in out and "KV cache" in out and "reasoning on" in out
    assert not client.is_alive()


def test_serve_compiles_the_decode_step_by_default_and_answers_as_eager(model_dir):
    """The CPU default on one rank: the decode step compiled at start-up (logged with its time), the
    same greedy text as the eager engine."""
    [want] = LLM(str(model_dir), dtype="float32", device="cpu", enforce_eager=True).generate(
        ["abcab"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    proc, url = start_server(model_dir, env={"XPUSERVE_ENFORCE_EAGER": "0"}, wait_s=600)
    try:
        reply = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "abcab", "max_tokens": 12,
                                                           "temperature": 0, "ignore_eos": True}, timeout=60).json()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert re.search(r"decode step compiled in [\d.]+ s", err), err[-2000:]
    assert reply["choices"][0]["text"] == want.outputs[0].text


def test_hostile_chat_template_file_stops_start_up(model_dir, tmp_path):
    template = tmp_path / "evil.jinja"
    template.write_text("{{ cycler.__init__.__globals__.os.popen('touch " + str(tmp_path / "pwned") + "').read() }}")
    proc = subprocess.run(
        [sys.executable, "-m", "xpuserve", "serve", str(model_dir), "--chat-template", str(template), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_chat_command_streams_reasoning_and_answer(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "xpuserve", "chat", str(model_dir), "--temperature", "0", "--max-tokens", "8",
         "--dtype", "float32", "--device", "cpu"],
        input=f"{CHAT_PROMPT}\nexit\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    reply = proc.stdout.split("> ")[1].strip()
    assert len(reply) > THINK_AFTER


def test_a_port_in_use_is_one_line_and_no_serving_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "xpuserve", "serve", str(model_dir), "--port", str(port), "--dtype", "float32", "--device", "cpu"],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2 and "serving" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], proc.stderr
