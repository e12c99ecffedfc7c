"""Which operand shapes each CPU kernel handles on this machine: every width K in 1..1024 at several
row counts, per op and dtype, under each ATen CPU capability this CPU can run (ATEN_CPU_CAPABILITY
lowers it). A case is "ok" when the result matches a float32 reference, "wrong" when it does not,
"crash" when it kills the process. Each capability runs in a worker process that runs the op that
can crash in a fork per case, so a crash costs a fork, not a restart. Prints the rule each op follows and writes the table to docs/platforms.md with --write.

    python benchmarks/cpu_kernel_sweep.py [--max-width 1024] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS = (1, 2, 3, 4, 5, 16)
N = 22  # output columns: not a multiple of the kernels' 4-column blocks
OPS = ("int8pack_bf16", "int8pack_f32", "int8pack_f16", "int_mm", "linear_bf16")
OFFSETS = (1, 2, 4, 8)  # misaligned input: the first row starts this many elements into its buffer
CAPABILITIES = ("default", "avx2", "avx512")
MAY_CRASH = {"int8pack_bf16"}  # each case in a fork of its own; the rest never crashed in a first sweep
MARK = Path(__file__).resolve().parents[1] / "docs" / "platforms.md"


def cases(max_width: int) -> list[tuple[str, int, int, int]]:
    """(op, rows, K, offset) in a fixed order; offset > 0 only at a K every kernel accepts."""
    out = [(op, m, k, 0) for op in OPS for m in ROWS for k in range(1, max_width + 1)]
    out += [(op, m, 64, off) for op in OPS for m in (2, 4) for off in OFFSETS]
    return out


def in_buffer(values, offset: int, m: int, k: int):
    """values[offset:offset + m*k] as [m, k], with random values after it: a kernel that reads past
    the last row sums them and gets a wrong result instead of a lucky zero."""
    return values[offset: offset + m * k].view(m, k)


def run_case(op: str, m: int, k: int, offset: int) -> str:
    import torch

    gen = torch.Generator().manual_seed(k * 31 + m)
    w = in_buffer(torch.randint(-127, 128, (N * k + 64,), dtype=torch.int8, generator=gen), 0, N, k)
    scale = torch.rand(N, generator=gen) / 64 + 1 / 128
    if op == "int_mm":
        xq = in_buffer(torch.randint(-127, 128, (offset + m * k + 64,), dtype=torch.int8, generator=gen), offset, m, k)
        got, ref = torch._int_mm(xq, w.t()).float(), xq.float() @ w.float().t()
        return "ok" if torch.equal(got, ref) else "wrong"
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[op.rsplit("_", 1)[1]]
    x = in_buffer(torch.randn(offset + m * k + 64, generator=gen).to(dtype), offset, m, k)
    ref = x.float() @ (w.float() * scale[:, None]).t()
    if op == "linear_bf16":
        got = torch.nn.functional.linear(x, (w.float() * scale[:, None]).to(dtype)).float()
    else:
        got = torch._weight_int8pack_mm(x, w, scale.to(dtype)).float()
    tolerance = 0.02 * ref.abs().max().item() + 1e-3
    return "ok" if (got - ref).abs().max().item() <= tolerance else "wrong"


EXIT_CODES = {"ok": 0, "wrong": 1}


def forked(case: tuple) -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(EXIT_CODES[run_case(*case)])
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash"
    return {code: name for name, code in EXIT_CODES.items()}.get(os.WEXITSTATUS(status), "crash")


def worker(max_width: int) -> None:
    import torch

    torch.set_num_threads(1)  # OpenMP's thread team does not survive a fork
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    for i, case in enumerate(cases(max_width)):
        result = forked(case) if case[0] in MAY_CRASH else run_case(*case)
        print(json.dumps([i, result]), flush=True)


def sweep(capability: str, max_width: int) -> tuple[str, dict]:
    """Runs every case under one capability; returns the capability torch reported and the results."""
    todo, results, reported = cases(max_width), {}, ""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", "--max-width", str(max_width)],
                          env=env, capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
        item = json.loads(line)
        if isinstance(item, dict):
            reported = item["capability"]
        else:
            results[todo[item[0]]] = item[1]
    return reported, results


def rule(failing: set[int], widths: range) -> str:
    if not failing:
        return "every K"
    for m in (2, 4, 8, 16, 32, 64):
        others = {k for k in widths if k % m}
        if failing <= others:
            return f"K % {m} == 0 only" + ("" if failing == others else f" ({len(failing)} of the {len(others)} others fail)")
    shown = sorted(failing)
    return f"fails at {len(shown)} widths: {shown[:12]}{' ...' if len(shown) > 12 else ''}"


def summarize(results: dict, max_width: int) -> list[str]:
    widths = range(1, max_width + 1)
    lines = []
    for op in OPS:
        per_rows = []
        for m in ROWS:
            bad = {k for (o, r, k, off), v in results.items() if o == op and r == m and off == 0 and v != "ok"}
            kinds = sorted({results[(op, m, k, 0)] for k in bad})
            per_rows.append(f"{m} row{'s' if m > 1 else ''}: {rule(bad, widths)}{' (' + '/'.join(kinds) + ')' if kinds else ''}")
        misaligned = sorted({f"{off * 2 if op != 'int_mm' else off} B" for (o, r, k, off), v in results.items()
                             if o == op and off and v != "ok"})
        lines.append(f"| `{op}` | {'; '.join(per_rows)} | {', '.join(misaligned) or 'any'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-width", type=int, default=1024)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="record the table in docs/platforms.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args.max_width)
    import torch

    from xpuserve.platforms.cpu_features import detect

    features = detect()
    top = torch.backends.cpu.get_cpu_capability()
    report = [f"CPU: {features.model}; instruction sets: {', '.join(features.isa_names()) or 'none'}; "
              f"torch {torch.__version__}; {len(cases(args.max_width))} cases per capability", ""]
    for capability in CAPABILITIES[: CAPABILITIES.index(top.lower()) + 1] if top.lower() in CAPABILITIES else CAPABILITIES[:1]:
        reported, results = sweep(capability, args.max_width)
        report += [f"ATEN_CPU_CAPABILITY={capability} (torch runs {reported}):", "",
                   "| op | widths K that give the right result, per row count | misaligned input that fails |",
                   "|---|---|---|", *summarize(results, args.max_width), ""]
    print("\n".join(report))
    if args.write:
        write_section(report)


def write_section(report: list[str]) -> None:
    text = MARK.read_text()
    begin, end = "<!-- cpu-kernel-sweep -->", "<!-- /cpu-kernel-sweep -->"
    block = f"{begin}\n" + "\n".join(report) + f"\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    MARK.write_text(text)


if __name__ == "__main__":
    main()
