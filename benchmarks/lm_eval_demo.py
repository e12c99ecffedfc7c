"""Quality through lm-evaluation-harness, in one run: the demo model served by `xpuserve serve`
(bf16, and INT8 weights) against transformers running the same checkpoint (lm-eval's own `hf`
model), on the same two local tasks.

    python benchmarks/lm_eval_demo.py --lm-eval-python VENV/bin/python   # writes docs/benchmarks.md

lm-eval is not a dependency of xpuserve: point --lm-eval-python at a Python with lm_eval[api],
torch and transformers. The tasks are written here (JSONL beside YAML), so nothing downloads:
- demo_arith_gen (generate_until): the chat prompt of a held-out problem; the number after
  </think> must be the answer. Through /v1/completions: batched token-id prompts, stop strings.
- demo_arith_choice (multiple choice, log-likelihood): the prompt plus the worked thought; the
  right answer (then the end of the message) must be the most likely of four. Through
  /v1/completions: echo + logprobs.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from server_fixture import free_port  # noqa: E402
from throughput import write_section  # noqa: E402
from xpuserve.demo import MODEL_DIR, data  # noqa: E402
from xpuserve.tokenizer import Tokenizer  # noqa: E402

TASKS = {
    "demo_arith_gen": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["<｜end▁of▁sentence｜>"], max_gen_toks: 96, do_sample: false, temperature: 0}
filter_list:
  - name: answer
    filter: [{function: regex, regex_pattern: "</think>\\\\s*(-?\\\\d+)"}, {function: take_first}]
metric_list: [{metric: exact_match}]
""",
    "demo_arith_choice": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list: [{metric: acc}]
""",
}


def write_tasks(folder: Path, n: int) -> None:
    tokenizer = Tokenizer.from_pretrained(MODEL_DIR)
    rng = random.Random(0)
    rows = []
    for problem in data.held_out()[:n]:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": data.user_message(problem, rng)}])
        prompt = chat.removeprefix(tokenizer.bos_token or "")  # lm-eval adds BOS as a token (add_bos_token)
        wrong = {problem.answer + d for d in (1, -1, 10, -10, 100)} - {problem.answer}
        # Each choice ends the message, so that "40" is not simply a likelier prefix of "405".
        eos = tokenizer.eos_token
        choices = [f"{problem.answer}{eos}", *(f"{w}{eos}" for w in rng.sample(sorted(wrong), 3))]
        rng.shuffle(choices)
        context = prompt + data.completion(problem).removesuffix(str(problem.answer))
        rows.append({"prompt": prompt, "answer": str(problem.answer), "context": context, "choices": choices,
                     "label": choices.index(f"{problem.answer}{eos}")})
    (folder / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, body in TASKS.items():
        source = f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / 'arith.jsonl'}}}}}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(source + body)


def lm_eval(python: str, folder: Path, model: str, model_args: str, name: str) -> dict[str, float]:
    out = folder / f"out_{name}"
    command = [python, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", *TASKS,
               "--include_path", str(folder), "--output_path", str(out), "--batch_size", "16", "--device", "cpu", "--log_samples"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, env={"HF_DATASETS_OFFLINE": "1",
                          "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(folder)})
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed for {name}:\n{proc.stderr[-3000:]}")
    [result] = out.rglob("results_*.json")
    results = json.loads(result.read_text())["results"]
    [samples] = out.rglob("samples_demo_arith_choice_*.jsonl")
    loglik = {}  # (doc, choice) -> log-likelihood of the choice
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        loglik.update({(sample["doc_id"], i): float(r[0]) for i, r in enumerate(sample["filtered_resps"])})
    return {"gen": results["demo_arith_gen"]["exact_match,answer"], "choice": results["demo_arith_choice"]["acc,none"],
            "loglik": loglik}


def served(python: str, folder: Path, quantization: str | None) -> tuple[dict[str, float], float]:
    """lm-eval's local-completions client against `xpuserve serve` on the demo model."""
    port = free_port()
    extra = ["--quantization", quantization] if quantization else []
    server = subprocess.Popen([sys.executable, "-m", "xpuserve", "serve", "--port", str(port), "--device", "cpu", "--dtype",
                               "bfloat16", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        args = (f"model=xpuserve-r1-demo,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={MODEL_DIR},"
                "tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,num_concurrent=4,max_retries=1")
        start = time.perf_counter()
        return lm_eval(python, folder, "local-completions", args, f"xpuserve_{quantization or 'bf16'}"), time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm-eval-python", required=True, help="a Python with lm_eval[api], torch and transformers")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tasks(folder, args.problems)
        scores, seconds = {}, {}
        for q in (None, "int8"):
            scores[f"xpuserve {q or 'bf16'}"], seconds[f"xpuserve {q or 'bf16'}"] = served(args.lm_eval_python, folder, q)
        start = time.perf_counter()
        hf_args = f"pretrained={MODEL_DIR},dtype=bfloat16,add_bos_token=True"
        scores["transformers bf16"] = lm_eval(args.lm_eval_python, folder, "hf", hf_args, "hf")
        seconds["transformers bf16"] = time.perf_counter() - start
    reference = scores["transformers bf16"]["loglik"]
    for s in scores.values():  # how far each model's log-likelihoods are from transformers'
        diffs = sorted(abs(ll - reference[key]) for key, ll in s["loglik"].items())
        s["diff"] = f"{diffs[len(diffs) // 2]:.4f} / {diffs[-1]:.4f}"
    for name, s in scores.items():
        print(f"{name:18s} generate exact match {s['gen']:.1%}, multiple choice acc {s['choice']:.1%}, "
              f"|log-likelihood - transformers'| median / max {s['diff']} over {len(s['loglik'])} choices, {seconds[name]:.0f} s")
    if not args.no_report:
        write_section([
            "## Quality through lm-evaluation-harness (demo model)",
            "",
            f"Command: `python benchmarks/lm_eval_demo.py --lm-eval-python VENV/bin/python` (lm-eval "
            f"{subprocess.run([args.lm_eval_python, '-c', 'import lm_eval; print(lm_eval.__version__)'], capture_output=True, text=True).stdout.strip()}, "
            f"{args.problems} held-out problems; xpuserve through lm-eval's `local-completions` client, transformers "
            "through its `hf` model, same tasks, greedy).",
            "",
            "| model | generate: exact match | multiple choice (log-likelihood): acc | abs. log-likelihood difference from transformers, median / max over all choices (nats) | wall time s |",
            "|---|---:|---:|---:|---:|",
            *[f"| {name} | {s['gen']:.1%} | {s['choice']:.1%} | {s['diff']} | {seconds[name]:.0f} |" for name, s in scores.items()],
            "",
            "Both paths of a served model that evaluations use work with lm-eval's own client: batched token-id",
            "prompts with stop strings, and echo + logprobs for log-likelihoods. The tasks are easy for this model",
            "(it was trained on them), so the accuracies say little about INT8; the log-likelihood differences do",
            "(xpuserve's CPU platform computes many-row bf16 matmuls in float32, transformers in bf16).",
            "",
        ])


if __name__ == "__main__":
    main()
