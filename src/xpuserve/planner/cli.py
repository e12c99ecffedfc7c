"""`xpuserve plan` and `xpuserve calibrate`: arguments and the two commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xpuserve.planner.chips import USER_FILE, load_chips
from xpuserve.planner.models import resolve_model
from xpuserve.planner.plan import Options, Workload, plan
from xpuserve.planner.report import plot, summary_rows, table, to_json

DTYPES = ("bf16", "fp8", "int8")


def add_planner_commands(sub) -> None:
    parser = sub.add_parser("plan", help="how many chips of which kind, and what a million tokens costs")
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder or built-in name (deepseek-r1, r1-distill-qwen-7b, ...)")
    parser.add_argument("--chip", action="append", help="chip profile key; repeat (default: every shipped chip)")
    parser.add_argument("--chips-file", help="extra TOML file of chip profiles (see xpuserve/planner/chips.toml)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight dtype (default bf16)")
    parser.add_argument("--kv-dtype", default="bf16", choices=DTYPES, help="KV cache dtype (default bf16)")
    parser.add_argument("--input-len", type=int, default=2000, help="prompt tokens per request (default 2000)")
    parser.add_argument("--output-len", type=int, default=500, help="output tokens per request (default 500)")
    parser.add_argument("--prefix-hit", type=float, default=0.0, help="fraction of prompt tokens in the prefix cache")
    parser.add_argument("--rate", type=float, help="arrival rate, requests per second")
    parser.add_argument("--concurrency", type=int, help="requests decoding at once")
    parser.add_argument("--ttft-ms", type=float, default=2000.0, help="time-to-first-token target (default 2000)")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="time-per-output-token target (default 50)")
    parser.add_argument("--price", action="append", default=[], metavar="CHIP=USD", help="$ per chip-hour, e.g. h800=2.0")
    parser.add_argument("--num-chips", type=int, help="a fixed deployment size")
    parser.add_argument("--layout", action="append", help="only these layouts, e.g. TP8 or EP144")
    parser.add_argument("--imbalance", type=float, default=1.0, help="hottest chip's expert load / mean, EP (default 1.0)")
    parser.add_argument("--overlap", action="store_true", help="hide communication behind compute (two micro-batches)")
    parser.add_argument("--compute-eff", type=float, help="fraction of peak matmul rate (default: the chip's)")
    parser.add_argument("--memory-eff", type=float, help="fraction of peak memory bandwidth (default: the chip's)")
    parser.add_argument("--comm-eff", type=float, help="fraction of peak link bandwidth (default: the chip's)")
    parser.add_argument("--min-seqs", type=int, default=16, help="full-length sequences a useful KV cache holds (default 16)")
    parser.add_argument("--all", action="store_true", help="print every layout tried, not only the best per chip")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG chart comparing the chips")
    parser.set_defaults(func=cmd_plan)

    cal = sub.add_parser("calibrate", help="measure this machine and write a chip profile for the planner")
    cal.add_argument("--out", default=None, help="profile file to write (default: ~/.config/xpuserve/chips.toml)")
    cal.add_argument("--steps", type=int, default=12, help="decode steps timed per batch size (default 12)")
    cal.set_defaults(func=cmd_calibrate)


def _prices(items: list[str]) -> dict[str, float]:
    prices = {}
    for item in items:
        chip, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--price takes CHIP=USD, got '{item}'")
        prices[chip] = float(value)
    return prices


def cmd_plan(args: argparse.Namespace) -> None:
    name, cfg = resolve_model(args.model)
    chips = load_chips(args.chips_file)
    keys = args.chip or list(chips)
    unknown = [k for k in keys if k not in chips]
    if unknown:
        raise ValueError(f"unknown chip(s) {unknown}; known: {', '.join(chips)}")
    if not 0 <= args.prefix_hit < 1:
        raise ValueError(f"--prefix-hit must be in [0, 1), got {args.prefix_hit}")
    work = Workload(args.input_len, args.output_len, args.prefix_hit, args.rate, args.concurrency)
    opts = Options(
        dtype=args.dtype, kv_dtype=args.kv_dtype, ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3,
        imbalance=args.imbalance, overlap=args.overlap, min_seqs=args.min_seqs, chips=args.num_chips,
        compute_eff=args.compute_eff, memory_eff=args.memory_eff, comm_eff=args.comm_eff, prices=_prices(args.price),
    )
    rows = plan(cfg, [chips[k] for k in keys], work, opts)
    if args.layout:
        wanted = {w.upper() for w in args.layout}
        rows = [r for r in rows if r.layout.split()[0] in wanted]
    if not rows:
        raise ValueError("no layout to evaluate (check --layout and --num-chips)")
    shown = rows if args.all else summary_rows(rows, work)
    title = f"{name} {args.dtype} weights, {args.input_len} in / {args.output_len} out, TPOT <= {args.tpot_ms:g} ms"
    if args.plot:
        try:
            plot(shown, args.plot, title)
        except RuntimeError as e:  # matplotlib missing
            raise SystemExit(f"xpuserve: error: {e}") from None
    if args.json:
        print(to_json(name, rows, shown, {"workload": vars(work), "options": vars(opts)}))
    else:
        print(title)
        print(table(shown))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from xpuserve.planner.calibrate import calibrate, profile_toml  # runs the engine: torch

    result = calibrate(steps=args.steps)
    out = Path(args.out) if args.out else USER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_toml(result.chip))
    chip = result.chip
    print(f"{chip.name}: bf16 weight streaming {chip.hbm_gbps:.1f} GB/s, bf16 matmul {chip.bf16_tflops * 1e3:.1f} GFLOP/s, "
          f"float32 matmul {chip.fp32_tflops * 1e3:.1f} GFLOP/s, per layer {chip.layer_overhead_us:.0f} us, "
          f"per busy expert {chip.expert_overhead_us:.0f} us")
    if chip.upcast_ns_per_param:
        print(f"bf16 -> float32 weight conversion {chip.upcast_ns_per_param:.3f} ns per weight, "
              f"fresh pages {chip.fresh_page_gbps:.2f} GB/s")
    for batch in result.measured:
        m, p = result.measured[batch], result.predicted[batch]
        print(f"decode batch {batch:3d}: engine {m:7.1f} tok/s, planner {p:7.1f} tok/s ({(p / m - 1) * 100:+.0f}%)")
    print(f"profile 'cpu' written to {out}")
    print(json.dumps({"measured": result.measured, "predicted": result.predicted}))
