"""Serving over HTTP: `xpuserve serve` against `transformers serve`, same checkpoint, same load, one run.

The checkpoint is the ~200M DeepSeek-V3-shaped model of the throughput section (planner/bench_model.py),
so the numbers sit next to the offline ones; the 1M-parameter demo model would measure mostly HTTP
and Python overhead. Its tokenizer is replaced by one that reads whitespace-separated `<i>` words
as one token each, with no BOS: `transformers serve` takes only text prompts, and this way the same
text is exactly `--input-len` tokens in both servers. Each server runs alone (started, measured,
stopped), driven by `xpuserve bench`'s code with the same prompts, `--max-concurrency` levels and
fixed output lengths (xpuserve: `ignore_eos`; transformers: `min_new_tokens` in its
`generation_config` field, since it rejects fields it does not know).

`transformers serve` needs `accelerate` and `psutil` (its `[serving]` extra), which the project's
environment does not install. Point `--peer-path` at a folder that holds them, e.g.
`pip install --target /tmp/peer_site accelerate psutil`; without them the section measures
xpuserve only and says so.

    python benchmarks/serving.py --peer-path /tmp/peer_site          # writes docs/benchmarks.md
    python benchmarks/serving.py --concurrency 1 --num-prompts 2 --no-report   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from throughput import write_section
from xpuserve.bench.report import summary_of
from xpuserve.bench.run import BenchConfig, run_benchmark
from xpuserve.bench.summary import Summary
from xpuserve.planner.bench_model import CONFIG, build_checkpoint
from xpuserve.planner.chips import load_chips
from xpuserve.platforms.cpu_features import detect as cpu_features

PEER = "transformers serve"


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """`<i>` words split on whitespace, one token each, no special tokens added: exact text lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_prompts(path: Path, n: int, length: int, seed: int) -> None:
    """JSONL of `n` prompts of `length` random words (ids 3.. of the vocabulary), distinct per seed so
    a later level never hits the prefix cache of an earlier one."""
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(f"<{rng.randrange(3, CONFIG['vocab_size'])}>" for _ in range(length))})
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cmd: list[str], env: dict, log: Path, timeout: float = 900.0):
    """Starts a server process, waits for GET /v1/models, yields its URL, stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not answer within {timeout:.0f} s")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peer_env(peer_path: str | None) -> dict | None:
    """The peer's environment, or None when transformers serve cannot run (its [serving] extra is missing)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if peer_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (peer_path, env.get("PYTHONPATH")) if p)
    check = subprocess.run([sys.executable, "-c", "import accelerate, psutil, fastapi, uvicorn, openai"], env=env,
                           capture_output=True, text=True)
    return env if check.returncode == 0 else None


def measure(url: str, model: str, args, folder: Path, concurrency: int, peer: bool) -> Summary:
    """One level: a warm-up request (a prompt of its own), then the prompts under `concurrency`."""
    fixed = {"generation_config": json.dumps({"max_new_tokens": args.output_len, "min_new_tokens": args.output_len,
                                              "do_sample": False})}
    config = BenchConfig(base_url=url, model=model, dataset_path=str(folder / f"prompts_{concurrency}.jsonl"),
                         random_output_len=args.output_len,
                         max_concurrency=concurrency, ignore_eos=not peer, extra_body=fixed if peer else {},
                         price_per_hour=args.price_per_hour)
    warm = run_benchmark(BenchConfig(**{**vars(config), "dataset_path": str(folder / "warmup.jsonl"),
                                        "random_output_len": 4, "extra_body": {}}))
    assert summary_of(warm).failed == 0, summary_of(warm).first_error
    summary = summary_of(run_benchmark(config))
    assert summary.failed == 0, summary.first_error
    assert summary.input_tokens == args.num_prompts * args.input_len, summary.input_tokens
    assert summary.output_tokens == args.num_prompts * args.output_len, summary.output_tokens
    return summary


def run_server(name: str, cmd: list[str], env: dict, model: str, args, folder: Path) -> dict[int, Summary]:
    results = {}
    with running(cmd, env, folder / f"{name.split()[0]}.log") as url:
        for c in args.concurrency:
            results[c] = s = measure(url, model, args, folder, c, peer=name == PEER)
            args.loads.append(os.getloadavg()[0])
            print(f"{name:>18} concurrency {c:2d}: {s.output_throughput:6.1f} output tok/s, TTFT {s.ttft.mean:7.0f} ms,"
                  f" TPOT {s.tpot.mean:6.1f} ms, ${s.usd_per_m_output:.3f}/M output", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="--max-concurrency levels")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--price-per-hour", type=float, default=load_chips()["cpu"].price_per_hour,
                        help="USD per hour of this machine (default: the planner's cpu profile)")
    parser.add_argument("--peer-path", default=None, help="folder with accelerate and psutil for transformers serve")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    args.loads = [os.getloadavg()[0]]  # at the start and after each level: other work on the cores skews every number

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = folder / "model"
        model_dir.mkdir()
        build_checkpoint(model_dir)
        write_word_tokenizer(model_dir, CONFIG["vocab_size"])
        for c in args.concurrency:
            write_prompts(folder / f"prompts_{c}.jsonl", args.num_prompts, args.input_len, seed=c)
        write_prompts(folder / "warmup.jsonl", 1, args.input_len, seed=-1)
        ours = run_server("xpuserve", [sys.executable, "-m", "xpuserve", "serve", str(model_dir), "--device", "cpu",
                                       "--dtype", "bfloat16", "--served-model-name", "bench"],
                          dict(os.environ), "bench", args, folder)
        env = peer_env(args.peer_path)
        theirs = {}
        if env is not None:
            theirs = run_server(PEER, [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
                                       "--device", "cpu", "--dtype", "bfloat16"], env, str(model_dir), args, folder)
        else:
            print(f"{PEER}: not run (accelerate/psutil not importable; see --peer-path)")
        for c in args.concurrency:
            if c in theirs:
                print(f"concurrency {c:2d}: output tok/s ratio {ours[c].output_throughput / theirs[c].output_throughput:.2f}x,"
                      f" TTFT ratio {theirs[c].ttft.mean / ours[c].ttft.mean:.2f}x")
        if not args.no_report:
            write_report(args, ours, theirs)


def write_report(args, ours: dict[int, Summary], theirs: dict[int, Summary]) -> None:
    import transformers

    command = "python benchmarks/serving.py" + (" --peer-path DIR" if theirs else "")
    lines = [
        f"## Serving over HTTP: xpuserve vs {PEER} (CPU, bf16)",
        "",
        f"Machine: {cpu_features().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
        f" transformers {transformers.__version__}; 1-minute load average {args.loads[0]:.2f} at the start,"
        f" at most {max(args.loads[1:], default=args.loads[0]):.2f} after a level (one server's 2 threads make about 2).",
        f"Command: `{command} --concurrency {' '.join(map(str, args.concurrency))} --num-prompts {args.num_prompts}"
        f" --input-len {args.input_len} --output-len {args.output_len}` (DIR: accelerate and psutil, the"
        " `transformers[serving]` extra the project does not install).",
        "Model: the throughput section's random DeepSeek-V3-shaped checkpoint (~200M parameters, bf16), with a"
        " whitespace word tokenizer so the same text prompt is the same number of tokens in both servers.",
        f"Load: `xpuserve bench` code, /v1/completions streaming, {args.num_prompts} prompts of {args.input_len} tokens"
        f" and exactly {args.output_len} output tokens per concurrency level, one server at a time;"
        f" cost at the planner's cpu price, ${args.price_per_hour:g}/hour.",
        "",
    ]
    if theirs:
        lines += [
            "| max concurrency | xpuserve out tok/s | transformers out tok/s | ratio | TTFT mean ms (xpuserve / transformers)"
            " | TPOT mean ms (xpuserve / transformers) | $/M output (xpuserve / transformers) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {c} | {ours[c].output_throughput:.1f} | {theirs[c].output_throughput:.1f}"
              f" | {ours[c].output_throughput / theirs[c].output_throughput:.2f}x"
              f" | {ours[c].ttft.mean:.0f} / {theirs[c].ttft.mean:.0f} | {ours[c].tpot.mean:.1f} / {theirs[c].tpot.mean:.1f}"
              f" | {ours[c].usd_per_m_output:.3f} / {theirs[c].usd_per_m_output:.3f} |" for c in args.concurrency],
            "",
            f"{PEER} runs one request at a time (its default); with `--continuous-batching` transformers 5.24 fails on"
            " this DeepseekV3 checkpoint on CPU (`index_copy_(): Source/destination tensor must have same slice"
            " shapes` in its paged cache), so requests queue behind each other and its TTFT grows with concurrency.",
            "",
        ]
    else:
        lines += [
            f"**xpuserve only**: {PEER} could not run here (it needs `accelerate` and `psutil`, not installed).",
            "",
            "| max concurrency | out tok/s | TTFT mean ms | TPOT mean ms | $/M output |",
            "|---:|---:|---:|---:|---:|",
            *[f"| {c} | {s.output_throughput:.1f} | {s.ttft.mean:.0f} | {s.tpot.mean:.1f} | {s.usd_per_m_output:.3f} |"
              for c, s in ours.items()],
            "",
        ]
    write_section(lines)


if __name__ == "__main__":
    main()
