"""`xpuserve bench` against a real uvicorn server: token counts, timings, arrivals, CLI and errors."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import httpx
import pytest

from server_fixture import free_port, running_server
from oracle import write_char_tokenizer
from xpuserve.bench.dataset import token_id_range
from xpuserve.bench.report import summary_of, table
from xpuserve.bench.run import BenchConfig, arrival_times, run_benchmark

INPUT_LEN, OUTPUT_LEN, PROMPTS = 20, 12, 8


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as (url, engine):
        yield url


def server_counters(url: str) -> dict[str, float]:
    """The server's own Prometheus counters and histogram sums, to compare the client's numbers with."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("xpuserve:") and not line.startswith(("xpuserve:request_success", "#")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def bench(url: str, **kwargs):
    args = dict(base_url=url, num_prompts=PROMPTS, random_input_len=INPUT_LEN, random_output_len=OUTPUT_LEN,
                ignore_eos=True)
    return run_benchmark(BenchConfig(**{**args, **kwargs}))


def test_token_counts_and_timings_agree_with_the_server(server, model_dir):
    before = server_counters(server)
    result = bench(server, tokenizer=str(model_dir), price_per_hour=3.5)
    after = server_counters(server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    s = summary_of(result)
    assert result.model == "tiny-r1" and s.completed == PROMPTS and s.failed == 0
    # Token counts: what the server counted itself, and what ignore_eos with token-id prompts fixes.
    assert s.input_tokens == delta["xpuserve:prompt_tokens_total"] == PROMPTS * INPUT_LEN
    assert s.output_tokens == delta["xpuserve:generation_tokens_total"] == PROMPTS * OUTPUT_LEN
    assert all(r.input_tokens == INPUT_LEN and r.output_tokens == OUTPUT_LEN for r in result.requests)
    for r in result.requests:
        assert 0 < r.ttft <= r.e2e and r.start >= r.scheduled
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (OUTPUT_LEN - 1))
        assert len(r.itl) == OUTPUT_LEN - 1  # one chunk per token from this server
        assert r.ttft + sum(r.itl) <= r.e2e + 1e-9
    assert s.tpot.mean == pytest.approx(1e3 * statistics.mean(r.tpot for r in result.requests))
    assert s.e2e.median == pytest.approx(1e3 * statistics.median(r.e2e for r in result.requests))
    # The client's TTFT and E2E contain the server's (arrival to first token, arrival to finish).
    assert sum(r.ttft for r in result.requests) >= delta["xpuserve:time_to_first_token_seconds_sum"]
    assert sum(r.e2e for r in result.requests) >= delta["xpuserve:e2e_request_latency_seconds_sum"]
    assert s.duration >= max(r.e2e for r in result.requests)
    # Cost: the price of an hour over the tokens of an hour at the measured rate.
    tokens_per_hour_out = PROMPTS * OUTPUT_LEN / s.duration * 3600
    tokens_per_hour_in = PROMPTS * INPUT_LEN / s.duration * 3600
    assert s.usd_per_m_output == pytest.approx(3.5 / tokens_per_hour_out * 1e6)
    assert s.usd_per_m_input == pytest.approx(3.5 / tokens_per_hour_in * 1e6)
    assert f"{s.usd_per_m_output:.4f}" in table(result)


def test_chat_counts_reasoning_as_the_first_tokens(server):
    result = bench(server, endpoint="chat", num_prompts=3)
    s = summary_of(result)
    assert s.completed == 3 and s.output_tokens == 3 * OUTPUT_LEN
    # The model thinks for 3 tokens first: timing only `content` would leave 3 gaps out and start later.
    assert all(len(r.itl) == OUTPUT_LEN - 1 and 0 < r.ttft < r.e2e for r in result.requests)
    assert all(r.input_tokens > INPUT_LEN for r in result.requests)  # 20 words, a character-level tokenizer


def test_max_concurrency_one_never_overlaps(server):
    free = sorted(bench(server, num_prompts=4).requests, key=lambda r: r.start)
    assert free[1].start < free[0].end  # without a limit, requests run side by side
    serial = sorted(bench(server, num_prompts=4, max_concurrency=1).requests, key=lambda r: r.start)
    assert all(r.ok for r in serial)
    assert all(later.start >= earlier.end for earlier, later in zip(serial, serial[1:]))


def test_poisson_arrivals_are_seeded_and_have_the_right_mean_gap():
    first, again = arrival_times(2000, 8.0, seed=7), arrival_times(2000, 8.0, seed=7)
    assert first == again and first != arrival_times(2000, 8.0, seed=8)
    gaps = [b - a for a, b in zip(first, first[1:])]
    assert first[0] == 0.0 and min(gaps) > 0
    assert statistics.mean(gaps) == pytest.approx(1 / 8.0, rel=0.1)
    assert arrival_times(5, float("inf"), seed=7) == [0.0] * 5


def test_requests_leave_on_the_schedule(server):
    result = bench(server, num_prompts=5, request_rate=20.0, seed=3, random_output_len=4)
    assert [r.scheduled for r in result.requests] == arrival_times(5, 20.0, seed=3)
    assert all(r.scheduled <= r.start < r.scheduled + 0.5 for r in result.requests)


def test_rejected_prompts_are_counted_with_the_server_message(server, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": "x" * 600}) + "\n")
    result = bench(server, dataset_path=str(dataset), num_prompts=None)
    s = summary_of(result)
    assert (s.completed, s.failed) == (1, 1)
    assert result.requests[1].error.startswith("HTTP 400: the prompt has ")
    assert "max_model_len is 512" in result.requests[1].error
    assert s.first_error == result.requests[1].error and f"First error: {s.first_error}" in table(result)
    assert s.output_tokens == OUTPUT_LEN


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xpuserve", "bench", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_writes_json(server, tmp_path):
    out = tmp_path / "result.json"
    result = run_cli("--base-url", server, "--num-prompts", "4", "--random-input-len", "10", "--random-output-len", "5",
                     "--ignore-eos", "--max-concurrency", "2", "--price-per-hour", "2", "--save-result", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Serving Benchmark Result" in lines[0]
    assert lines[1].split() == ["Successful", "requests:", "4"]
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and saved["total_output_tokens"] == 20 and saved["total_input_tokens"] == 40
    assert saved["max_concurrency"] == 2 and saved["request_rate"] is None and len(saved["requests"]) == 4
    assert f"{saved['usd_per_m_output']:.4f}" in result.stdout
    assert saved["usd_per_m_output"] == pytest.approx(2 / (20 / saved["duration"] * 3600) * 1e6)


def test_unreachable_url_is_one_line_and_exit_2():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("--base-url", url, "--num-prompts", "1")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xpuserve: error: cannot reach {url}/v1/models"), result.stderr


def test_token_ids_come_from_the_tokenizer_vocabulary(model_dir, tmp_path):
    assert token_id_range(str(model_dir)) == (3, 256)  # the checkpoint's vocab_size
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 129280}))
    assert token_id_range(str(tmp_path)) == (3, 129280)
    assert token_id_range(None) == (3, 256)
    with pytest.raises(FileNotFoundError):
        token_id_range(str(tmp_path / "missing"))
    padded = tmp_path / "padded"  # a checkpoint with more embedding rows than its tokenizer has tokens
    padded.mkdir()
    (padded / "config.json").write_text(json.dumps({"vocab_size": 256}))
    write_char_tokenizer(padded, 200)
    assert token_id_range(str(padded)) == (3, 200)
