"""`xpuserve bench`: its arguments and the command."""

from __future__ import annotations

import argparse
import json

from xpuserve.bench.report import save, table
from xpuserve.bench.run import BenchConfig, run_benchmark
from xpuserve.engine_args import positive_int


def add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (TTFT, TPOT, tok/s, $/M tokens)")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default http://127.0.0.1:8000)")
    bench.add_argument("--model", default=None, help="model name to request (default: the first id of GET /v1/models)")
    bench.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                       help="/v1/completions with token-id prompts (exact input length), or /v1/chat/completions with random words")
    bench.add_argument("--num-prompts", type=positive_int, default=None,
                       help="requests to send (default 100, or every line of --dataset-path)")
    bench.add_argument("--random-input-len", type=positive_int, default=256, help="prompt tokens (chat: words) (default 256)")
    bench.add_argument("--random-output-len", type=positive_int, default=128, help="max output tokens (default 128)")
    bench.add_argument("--dataset-path", default=None, metavar="FILE", help='JSONL file, one {"prompt": "..."} per line')
    bench.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="model or tokenizer folder: draw prompt token ids from its whole vocabulary (default: ids 3-255)")
    bench.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests per second, Poisson arrivals (default inf: all at once)")
    bench.add_argument("--max-concurrency", type=positive_int, default=None, help="most requests in flight at once")
    bench.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times (default 0)")
    bench.add_argument("--ignore-eos", action="store_true",
                       help="send ignore_eos and min_tokens so every output is exactly --random-output-len tokens")
    bench.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                       help="the deployment's price per hour: report USD per million input and output tokens")
    bench.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                       help="fields merged into every request body, e.g. '{\"top_k\": 1}'")
    bench.add_argument("--save-result", default=None, metavar="FILE.json", help="write the result and every request's timings")
    bench.set_defaults(func=cmd_bench)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def cmd_bench(args: argparse.Namespace) -> None:
    config = BenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        dataset_path=args.dataset_path, tokenizer=args.tokenizer, request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, seed=args.seed, ignore_eos=args.ignore_eos,
        price_per_hour=args.price_per_hour, extra_body=args.extra_body,
    )
    result = run_benchmark(config)
    print(table(result), flush=True)
    if args.save_result:
        save(result, args.save_result)
        print(f"wrote {args.save_result}")
