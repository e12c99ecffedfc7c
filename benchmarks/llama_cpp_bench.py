"""llama.cpp on the benchmark model: build it, convert the checkpoint to GGUF, time `llama-batched-bench`.

llama.cpp comes from the tree vendored in the `llama-cpp-python` source package, which must already
be on disk (nothing here downloads):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc

    python benchmarks/llama_cpp_bench.py                       # prints bf16 and Q8_0 rates per workload
    python benchmarks/llama_cpp_bench.py --write               # and adds a section to docs/benchmarks.md
    python benchmarks/llama_cpp_bench.py --llama-cpp-sdist PATH

Everything built lives under ~/.cache/xpuserve/llama.cpp-<version>/ (the tree, `build/`, the
converter's own Python packages in `pydeps/`, and GGUF files in `gguf/<checkpoint hash>/`); a second
run reuses all of it. `llama_cpp_rates(checkpoint, workloads)` is the entry point for other scripts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xpuserve"
SDIST_DIRS = ["/tmp/llsrc", str(CACHE)]  # where an already downloaded sdist is looked for
FETCH_HINT = "pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc"
TARGETS = ["llama-batched-bench", "llama-quantize", "llama-simple"]
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF",
]
FORMATS = ("bf16", "q8_0")
# (requests, prompt tokens, output tokens): the rows of the speed issue.
WORKLOADS = [(1, 128, 128), (16, 128, 128), (64, 128, 128), (1, 2048, 64), (8, 2048, 64), (1, 8192, 64)]


@dataclass
class Rate:
    """One `llama-batched-bench` row: `requests` independent prompts, prefill then decode."""

    requests: int
    prompt_len: int
    output_len: int
    prefill: float  # prompt tokens per second, summed over requests
    decode: float  # generated tokens per second, summed over requests
    seconds: float  # prefill + decode time

    @property
    def end_to_end(self) -> float:
        """Generated tokens per second of the whole run, prefill included (what benchmarks/throughput.py times)."""
        return self.requests * self.output_len / self.seconds


def find_sdist(path: str | None = None) -> Path:
    if path:
        return Path(path)
    found = sorted(p for d in SDIST_DIRS for p in glob.glob(f"{d}/llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"no llama-cpp-python source package found in {SDIST_DIRS}; fetch it with: {FETCH_HINT}")
    return Path(found[-1])


def source_tree(sdist: Path) -> Path:
    """Extracts the sdist's vendor/llama.cpp into the cache (once) and returns it."""
    version = re.match(r"llama_cpp_python-(.+)\.tar\.gz", sdist.name).group(1)
    tree = CACHE / f"llama.cpp-{version}"
    if (tree / "CMakeLists.txt").exists():
        return tree
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
        tar.extractall(tmp, members=members, filter="tar")
    tmp.rename(tree)
    return tree


def build(tree: Path, jobs: int = 2) -> Path:
    """Builds the llama.cpp tools needed here (CPU backend only) unless built; returns the bin folder."""
    build_dir = tree / "build"
    bin_dir = build_dir / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    start = time.perf_counter()
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS], check=True)
    print(f"built llama.cpp ({', '.join(TARGETS)}) in {time.perf_counter() - start:.0f} s: {bin_dir}")
    return bin_dir


# The converter names the pre-tokenizer by hashing how the tokenizer splits a fixed text, and refuses
# ones it does not know; the benchmark's tokenizers are made up, so this driver names it "default"
# (llama.cpp's generic split). It only decides how llama.cpp splits text: the benchmark feeds ids.
CONVERT_DRIVER = """
import sys
sys.argv[0] = {script!r}
sys.path.insert(0, {tree!r})
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""
CONVERTER_MODULES = ["torch", "numpy", "safetensors", "transformers", "tqdm", "yaml"]


def byte_level_tokenizer(vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer of `vocab_size` ids: the 256 byte symbols, then their pairs.

    llama.cpp's converter takes a BPE tokenizer with merges (the benchmark's own word-level one has none);
    its content does not matter for speed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [(a, b) for a in alphabet for b in alphabet][: vocab_size - len(alphabet)]
    vocab = {s: i for i, s in enumerate(alphabet + [a + b for a, b in pairs])}
    tokenizer = Tokenizer(models.BPE(vocab, pairs))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def checkpoint_hash(checkpoint: Path) -> str:
    digest = hashlib.sha256(CONVERT_DRIVER.encode() + b"scoring_func")  # a new way of converting, a new folder
    for f in sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "config.json"]:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def convert(tree: Path, bin_dir: Path, checkpoint: Path, formats=FORMATS) -> dict[str, Path]:
    """GGUF files of `checkpoint` per format (bf16 by the converter, Q8_0 by llama-quantize), cached by content."""
    missing = [m for m in CONVERTER_MODULES if not _importable(m)]
    pydeps = tree / "pydeps"
    if missing:
        raise SystemExit(f"llama.cpp's converter needs {missing}: pip install --target {pydeps} {' '.join(missing)}")
    out = tree / "gguf" / checkpoint_hash(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out / f"model-{fmt}.gguf" for fmt in formats}
    bf16 = out / "model-bf16.gguf"
    if not bf16.exists():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out) as staging:  # the checkpoint with a BPE tokenizer beside it
            staging = Path(staging)
            for f in checkpoint.iterdir():
                if f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "config")):
                    (staging / f.name).symlink_to(f.resolve())
            config = json.loads((checkpoint / "config.json").read_text())
            if config.get("model_type") == "deepseek_v3":  # transformers' V3 routes by sigmoid without saying so
                config.setdefault("scoring_func", "sigmoid")
            (staging / "config.json").write_text(json.dumps(config))
            vocab_size = config["vocab_size"]
            byte_level_tokenizer(vocab_size).save(str(staging / "tokenizer.json"))
            (staging / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
            driver = CONVERT_DRIVER.format(script=str(tree / "convert_hf_to_gguf.py"), tree=str(tree))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), str(pydeps)]))
            tmp = bf16.with_suffix(".part")
            _run([sys.executable, "-c", driver, str(staging), "--outtype", "bf16", "--outfile", str(tmp)], env=env)
            tmp.rename(bf16)
        print(f"converted {checkpoint} to {bf16} in {time.perf_counter() - start:.0f} s")
    for fmt, path in paths.items():
        if not path.exists():
            tmp = path.with_suffix(".part")
            _run([str(bin_dir / "llama-quantize"), str(bf16), str(tmp), fmt.upper(), "2"])
            tmp.rename(path)
    return paths


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def batched_bench(bin_dir: Path, gguf: Path, workloads=WORKLOADS, threads: int = 2) -> list[Rate]:
    """Times `workloads` with llama-batched-bench (random prompt ids, one prompt per request, no sharing)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for requests, prompt_len, output_len in workloads:
        groups.setdefault((prompt_len, output_len), []).append(requests)
    rates = {}
    for (prompt_len, output_len), requests in groups.items():
        cmd = [
            str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-c", str(max(requests) * (prompt_len + output_len)), "-b", "2048", "-ub", "512",
            "-npp", str(prompt_len), "-ntg", str(output_len), "-npl", ",".join(map(str, requests)),
            "--output-format", "jsonl",
        ]
        for rate in parse_jsonl(_run(cmd)):
            rates[(rate.requests, rate.prompt_len, rate.output_len)] = rate
    return [rates[w] for w in workloads]


def parse_jsonl(text: str) -> list[Rate]:
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [Rate(r["pl"], r["pp"], r["tg"], r["speed_pp"], r["speed_tg"], r["t"]) for r in rows]


def _run(cmd: list[str], **kwargs) -> str:
    """Runs cmd; returns its stdout, or raises with the tail of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def llama_cpp_rates(checkpoint: Path, workloads=WORKLOADS, formats=FORMATS, threads: int = 2, repeats: int = 2,
                    sdist: str | None = None) -> dict[str, list[Rate]]:
    """Per format, the median (over `repeats` runs) llama.cpp rates of each workload on `checkpoint`."""
    tree = source_tree(find_sdist(sdist))
    bin_dir = build(tree)
    ggufs = convert(tree, bin_dir, Path(checkpoint), formats)
    result = {}
    for fmt in formats:
        runs = [batched_bench(bin_dir, ggufs[fmt], workloads, threads) for _ in range(repeats)]
        result[fmt] = [_median(rows) for rows in zip(*runs)]
    return result


def _median(rates: tuple[Rate, ...]) -> Rate:
    import statistics

    first = rates[0]
    return Rate(first.requests, first.prompt_len, first.output_len,
                *(statistics.median(getattr(r, f) for r in rates) for f in ("prefill", "decode", "seconds")))


def report_lines(result: dict[str, list[Rate]], version: str, threads: int, repeats: int, command: str,
                 note: str = "") -> list[str]:
    from xpuserve.platforms.cpu_features import detect

    lines = [
        "## llama.cpp on the benchmark model (CPU)",
        "",
        f"Machine: {detect().describe()}, {threads} threads.{note}",
        f"Command: `{command}`. llama.cpp as vendored in the llama-cpp-python {version} sdist, built for the CPU"
        " (GGML_NATIVE); the checkpoint converted with its `convert_hf_to_gguf.py` (bf16) and `llama-quantize` (Q8_0);"
        f" `llama-batched-bench`, random prompt ids, one prompt per request; median of {repeats} runs."
        " The GGUF carries a stand-in byte-level BPE vocabulary of the model's size (the converter needs merges),"
        " which does not affect speed.",
        "Tokens/s summed over requests: prefill = prompt tokens / prompt time, decode = generated tokens / generation"
        " time, end-to-end = generated tokens / whole run (as benchmarks/throughput.py times xpuserve).",
    ]
    for fmt, rates in result.items():
        lines += [
            "",
            f"llama.cpp {fmt.upper()}:",
            "",
            "| requests | prompt | output | prefill tok/s | decode tok/s | end-to-end tok/s |",
            "|---:|---:|---:|---:|---:|---:|",
            *[f"| {r.requests} | {r.prompt_len} | {r.output_len} | {r.prefill:,.0f} | {r.decode:,.1f} | {r.end_to_end:,.1f} |"
              for r in rates],
        ]
    return lines + [""]


def check_greedy(checkpoint: Path, prompt: str = "The capital of France is", tokens: int = 12,
                 sdist: str | None = None) -> tuple[str, str]:
    """Greedy continuations of `prompt` by llama-simple (bf16 GGUF) and by xpuserve (bf16) on the same checkpoint.

    Both see the ids of `byte_level_tokenizer` (the GGUF's vocabulary); the texts are compared, as
    llama-simple prints pieces. A random model has flat logits, so bf16 rounding may flip a late token.
    """
    from xpuserve import LLM, SamplingParams

    tree = source_tree(find_sdist(sdist))
    bin_dir = build(tree)
    gguf = convert(tree, bin_dir, Path(checkpoint), ("bf16",))["bf16"]
    out = _run([str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(tokens), prompt], errors="replace")
    theirs = out.strip("\n").removeprefix(prompt)
    tokenizer = byte_level_tokenizer(json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])
    llm = LLM(str(checkpoint), dtype="bfloat16", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = llm.generate([tokenizer.encode(prompt).ids], params)[0].outputs[0].token_ids
    return theirs, tokenizer.decode(list(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder; default: build the benchmark model")
    parser.add_argument("--llama-cpp-sdist", help=f"the llama-cpp-python .tar.gz (default: found in {SDIST_DIRS})")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the 1 x 128 / 128 row, one run")
    parser.add_argument("--check", action="store_true", help="compare greedy output with xpuserve's, then exit")
    parser.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    parser.add_argument("--note", default="", help="a sentence for the docs section, e.g. 'The machine was shared.'")
    args = parser.parse_args()
    workloads = WORKLOADS[:1] if args.quick else WORKLOADS
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from xpuserve.planner.bench_model import build_checkpoint

            checkpoint = Path(tmp)
            build_checkpoint(checkpoint)
        if args.check:
            theirs, ours = check_greedy(checkpoint, sdist=args.llama_cpp_sdist)
            print(f"llama.cpp: {theirs!r}\nxpuserve:  {ours!r}\n{'same' if theirs == ours else 'DIFFERENT'}")
            return
        result = llama_cpp_rates(checkpoint, workloads, args.formats, args.threads, repeats, args.llama_cpp_sdist)
    command = "python benchmarks/llama_cpp_bench.py" + (" --quick" if args.quick else "")
    version = find_sdist(args.llama_cpp_sdist).name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    lines = report_lines(result, version, args.threads, repeats, command, f" {args.note}" if args.note else "")
    print("\n".join(lines))
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import write_section  # noqa: E402 (throughput.py imports torch and xpuserve)

        write_section(lines)


if __name__ == "__main__":
    main()
