"""Serving across ranks: real torchrun, two gloo processes on this machine, float32.

Tensor parallelism, and tensor with expert parallelism, give the greedy outputs of one rank for a
batch of mixed requests; each rank holds half of every sharded weight; the HTTP server under
torchrun answers the official openai client; a rank that dies or hangs stops the whole server
with a message naming it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from distributed_run import prompt_scores, sampling_params
from oracle import make_checkpoint, write_char_tokenizer
from server_fixture import free_port
from test_fp8 import ODD_SHAPES, write_fp8_checkpoint
from xpuserve import LLM, SamplingParams
from xpuserve.weights.convert import convert_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
RUN_SCRIPT = Path(__file__).with_name("distributed_run.py")
NUM_REQUESTS = 12
ENGINE_ARGS = dict(max_num_batched_tokens=48, block_size=4)  # steps mix chunked prefills and decodes
# Weights each rank holds half of; the rest (norms, routers, MLA's down-projections q_a/kv_a) every rank holds whole.
SHARDED = re.compile(r"embed_tokens|lm_head|q_proj|q_b_proj|kv_b_proj|o_proj|qkv_proj|gate_up_proj|down_proj|experts\.w")
TP, TP_EP = dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, enable_expert_parallel=True)
# v3_fp8: R1's block-FP8 format with odd shapes, so shards start and end inside 128 x 128 blocks.
# v3_int8: `xpuserve convert --to int8` of it, as served on chips without FP8 (Ascend).
CASES = {"v3_grouped": {"tp2": TP, "tp2_ep": TP_EP}, "qwen2": {"tp2": TP}, "v3_fp8": {"tp2": TP, "tp2_ep": TP_EP},
         "v3_int8": {"tp2": TP, "tp2_ep": TP_EP}}
# INT8 scales are per output row: whole on every rank for row-parallel layers (input split), unless
# experts are partitioned whole (EP).
ROW_PARALLEL_SCALE = re.compile(r"(o_proj|down_proj)\.weight_scale$|experts\.w2_scale$")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for arch in CASES:
        path = tmp_path_factory.mktemp(arch)
        if arch in ("v3_fp8", "v3_int8"):
            reference = make_checkpoint("v3_grouped", path, seed=3, **ODD_SHAPES)
            write_fp8_checkpoint(path)
        else:
            reference = make_checkpoint(arch, path, seed=3)
        write_char_tokenizer(path, reference.config.vocab_size)
        if arch == "v3_int8":
            converted = path.with_name(f"{path.name}_converted")
            convert_checkpoint(path, converted, "int8", max_shard_size=1 << 30)
            path = converted
        made[arch] = path
    return made


def requests(vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 40))] for _ in range(NUM_REQUESTS)]
    return prompts, [rng.randint(1, 16) for _ in range(NUM_REQUESTS)]


def run_ranks(model: Path, cases: dict[str, dict], prompts, max_tokens, out: Path, env: dict | None = None,
              **case_options) -> dict[str, list[dict]]:
    """Every case in one torchrun: per case, what each rank reported."""
    spec = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "out": str(out),
            "cases": [{"name": name, "engine_args": {**ENGINE_ARGS, **args}, **case_options} for name, args in cases.items()]}
    (out / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([*TORCHRUN, str(RUN_SCRIPT), str(out / "spec.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)] for name in cases}


@pytest.mark.parametrize("arch", list(CASES))
def test_parallel_outputs_equal_one_rank_and_weights_are_split(arch, checkpoints, tmp_path):
    llm = LLM(checkpoints[arch], dtype="float32", device="cpu", **ENGINE_ARGS)
    prompts, max_tokens = requests(llm.engine.model_config.vocab_size)
    generated = llm.generate(prompts, [sampling_params(i, n) for i, n in enumerate(max_tokens)])
    expected = [o.outputs[0].token_ids for o in generated]
    full = {name: p.nbytes for name, p in llm.engine.model.named_parameters()}
    reports = run_ranks(checkpoints[arch], CASES[arch], prompts, max_tokens, tmp_path)
    for case, ranks in reports.items():
        assert ranks[0]["outputs"] == expected, case
        for scores, output in zip(ranks[0]["prompt_scores"], generated):
            want = prompt_scores(output)
            assert (scores is None) == (want is None), case
            if want is not None:
                assert [t for t, _ in scores] == [t for t, _ in want]
                assert [lp for _, lp in scores] == pytest.approx([lp for _, lp in want], abs=1e-4), case
        for report in ranks:
            assert report["engine_freed"], case  # nothing keeps a stopped engine's model and cache alive
            held = {name: nbytes for name, (nbytes, _) in report["parameters"].items()}
            assert held.keys() == full.keys()
            for name, nbytes in held.items():
                whole = ROW_PARALLEL_SCALE.search(name) and not (case == "tp2_ep" and ".mlp.experts." in name)
                split = SHARDED.search(name) and not whole
                assert nbytes == (full[name] // 2 if split else full[name]), (case, name)
            sharded = sum(n for name, n in full.items() if SHARDED.search(name))
            assert sharded > 0.8 * sum(full.values())  # the split parts are most of the model
            assert sum(held.values()) < 0.6 * sum(full.values())
    if "tp2_ep" in reports:
        assert_experts_partitioned_and_counted(llm.engine.model_config, reports)


def test_a_clean_stop_during_a_long_last_step_stops_every_rank_cleanly(checkpoints, tmp_path):
    """Rank 0 keeps beating until STOP is out: a last step longer than the watchdog's limit is not
    taken for a dead rank 0 by the followers waiting for STOP."""
    prompts, max_tokens = [[1, 2, 3]], [2]
    reports = run_ranks(checkpoints["qwen2"], {"tp2": TP}, prompts, max_tokens, tmp_path,
                        env={"XPUSERVE_DEAD_AFTER": "2"}, last_step_s=12)  # run_ranks asserts exit 0
    assert [r["engine_freed"] for r in reports["tp2"]] == [True, True]


def assert_experts_partitioned_and_counted(config, reports) -> None:
    experts, inter = config.n_routed_experts, config.moe_intermediate_size
    w13 = f"model.layers.{config.first_k_dense_replace}.mlp.experts.w13"
    assert [r["parameters"][w13][1] for r in reports["tp2_ep"]] == [[experts // 2, 2 * inter, config.hidden_size]] * 2
    assert [r["parameters"][w13][1] for r in reports["tp2"]] == [[experts, inter, config.hidden_size]] * 2
    ep = reports["tp2_ep"]
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    routed = ep[0]["tokens_computed"] * config.num_experts_per_tok * moe_layers
    assert ep[0]["tokens_per_expert"] == ep[1]["tokens_per_expert"]  # the router runs on every rank
    assert sum(ep[0]["tokens_per_rank"]) == routed
    assert all(n > 0 for n in ep[0]["tokens_per_rank"])


def start_torchrun_server(model: Path, log_dir: Path, *extra: str, env: dict | None = None):
    port = free_port()
    out, err = open(log_dir / "out.txt", "w"), open(log_dir / "err.txt", "w")
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "xpuserve", "serve", str(model), "--port", str(port), "--dtype", "float32", "--device", "cpu",
         "--served-model-name", "m", "-tp", "2", *extra],
        stdout=out, stderr=err, env={**os.environ, **(env or {})}, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                follower = re.search(r"rank 1 \(pid (\d+)\)", (log_dir / "out.txt").read_text())
                return proc, url, int(follower.group(1))
        except httpx.TransportError:
            time.sleep(0.2)
    stop_group(proc)
    raise AssertionError(f"server did not start: {(log_dir / 'err.txt').read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_http_server_under_torchrun_answers_then_a_killed_rank_stops_it(checkpoints, tmp_path):
    path = checkpoints["v3_grouped"]
    [want] = LLM(path, dtype="float32", device="cpu").generate(["hello"], SamplingParams(temperature=0, max_tokens=10))
    proc, url, follower = start_torchrun_server(path, tmp_path, "--enable-expert-parallel")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.completions.create(model="m", prompt="hello", max_tokens=10, temperature=0)
        assert reply.choices[0].text == want.outputs[0].text
        assert "2 ranks (tensor parallel, expert parallel)" in (tmp_path / "out.txt").read_text()
        os.kill(follower, signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        stop_group(proc)
    err = (tmp_path / "err.txt").read_text()
    assert code != 0
    assert re.search(r"rank\s*:?\s*1\b", err), err[-3000:]


@pytest.mark.parametrize("detector", ["heartbeat", "collective_timeout"])
def test_a_hung_rank_stops_the_server_with_its_rank_named(detector, checkpoints, tmp_path):
    """A frozen rank keeps its sockets open: the heartbeat watchdog tells when idle, the collective
    timeout when a request's forward pass waits for it."""
    env, message = {"XPUSERVE_DEAD_AFTER": "3"}, "xpuserve: rank 1 stopped responding"
    if detector == "collective_timeout":
        env, message = {"XPUSERVE_DEAD_AFTER": "600", "XPUSERVE_COLLECTIVE_TIMEOUT": "6"}, "xpuserve: rank 1 stopped: a collective on rank 0 failed"
    proc, url, follower = start_torchrun_server(checkpoints["qwen2"], tmp_path, env=env)
    try:
        os.kill(follower, signal.SIGSTOP)
        if detector == "collective_timeout":
            with pytest.raises(httpx.HTTPError):  # the server dies under the request
                httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "ab", "max_tokens": 4}, timeout=60)
        started = time.monotonic()
        while message not in (tmp_path / "err.txt").read_text() and time.monotonic() - started < 30:
            time.sleep(0.2)
        os.kill(follower, signal.SIGCONT)  # let it take torchrun's SIGTERM
        code = proc.wait(timeout=60)
    finally:
        stop_group(proc)
    err = (tmp_path / "err.txt").read_text()
    assert code != 0
    assert message in err, err[-3000:]


def test_tensor_parallel_without_torchrun_says_how_to_launch(checkpoints):
    proc = subprocess.run([sys.executable, "-m", "xpuserve", "serve", str(checkpoints["qwen2"]), "-tp", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "torchrun --nproc-per-node 2" in proc.stderr and "Traceback" not in proc.stderr
