"""`python -m xpuserve generate` as a real subprocess, against transformers' greedy generation."""

import json
import subprocess
import sys

import pytest

from oracle import STORIES
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} is absent (shared test model)")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xpuserve", *args], capture_output=True, text=True, timeout=300)


def transformers_completion(prompt: str, max_new_tokens: int) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    # Text after the prompt; decoding the new tokens alone would drop the first one's leading space.
    prefix = tok.decode(inputs["input_ids"][0], skip_special_tokens=True)
    full = tok.decode(out[0], skip_special_tokens=True)
    assert full.startswith(prefix)
    return full[len(prefix):]


@needs_stories
def test_generate_matches_transformers_greedy():
    prompt = "Once upon a time"
    expected = transformers_completion(prompt, 32)
    assert expected.strip()
    result = run_cli("generate", str(STORIES), "--prompt", prompt, "--max-tokens", "32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + expected + "\n"


def test_missing_config_is_one_line_error(tmp_path):
    result = run_cli("generate", str(tmp_path), "--prompt", "hello")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "config.json" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_reader_that_goes_away_is_not_an_error():
    proc = subprocess.Popen([sys.executable, "-m", "xpuserve", "plan", "deepseek-r1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has what it wants
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("field, value", [("hidden_size", "big"), ("rms_norm_eps", [1]), ("quantization_config", {"quant_method": "fp8", "weight_block_size": ["a", "b"]})])
def test_config_field_of_the_wrong_type_is_one_line_error(tmp_path, model_dir, field, value):
    for file in model_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    result = run_cli("generate", str(tmp_path), "--prompt", "hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0], result.stderr


def test_generate_runs_through_the_engine(model_dir):
    """Engine flags reach the engine: two prompts through a one-sequence batch print what LLM.generate returns."""
    from xpuserve import LLM, SamplingParams

    prompts = ["hello there", "a"]
    outputs = LLM(model_dir, dtype="float32", device="cpu").generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    args = [a for p in prompts for a in ("--prompt", p)]
    result = run_cli("generate", str(model_dir), *args, "--max-tokens", "6", "--dtype", "float32", "--device", "cpu",
                     "--max-num-seqs", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n".join(p + o.outputs[0].text + "\n" for p, o in zip(prompts, outputs))
    assert all(o.outputs[0].text for o in outputs)
    too_long = run_cli("generate", str(model_dir), "--prompt", "hi", "--max-model-len", "2", "--device", "cpu")
    assert too_long.returncode == 2 and "max_model_len" in too_long.stderr, too_long.stderr
