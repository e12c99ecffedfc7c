"""A real trained model (stories260K, a TinyStories Llama) against transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from xpuserve.generate import generate, prompt_logits
from xpuserve.tokenizer import Tokenizer
from xpuserve.weights import load_model

from oracle import STORIES
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} is not on this machine")
PROMPTS = ["Once upon a time", "Lily and Ben", "The cat"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES).eval()


def test_greedy_continuation_matches_transformers(reference):
    tokenizer = Tokenizer.from_pretrained(STORIES)
    model = load_model(STORIES, dtype="float32", device="cpu")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ours = generate(model, prompts, max_new_tokens=64, stop_token_ids=[tokenizer.eos_token_id])
    for prompt, tokens in zip(prompts, ours):
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64)[0, len(prompt):]
        assert tokens == expected.tolist()
    assert tokenizer.decode(ours[0]).startswith(", there was a little girl named Lily")


@torch.no_grad()
def test_bfloat16_argmax_agrees_on_trained_weights(reference):
    """On a trained model's confident predictions, bf16 picks the same token as transformers' bf16 run."""
    tokenizer = Tokenizer.from_pretrained(STORIES)
    float_model = load_model(STORIES, dtype="float32", device="cpu")
    stories = generate(float_model, [tokenizer.encode(p) for p in PROMPTS], max_new_tokens=160)
    texts = [tokenizer.encode(p) + s for p, s in zip(PROMPTS, stories)]
    ours = prompt_logits(load_model(STORIES, dtype="bfloat16", device="cpu"), texts)
    reference = copy.deepcopy(reference).to(torch.bfloat16)
    agree = total = 0
    for logits, ids in zip(ours, texts):
        theirs = reference(torch.tensor([ids])).logits[0]
        agree += (logits.argmax(-1) == theirs.argmax(-1)).sum().item()
        total += len(ids)
    assert total > 450
    assert agree / total >= 0.99, f"bf16 argmax agreement {agree}/{total}"


@torch.no_grad()
def test_int8_argmax_agrees_with_bf16_on_trained_weights():
    """INT8 weights keep a trained model's greedy choices: >= 97% of 512+ positions equal bf16's."""
    tokenizer = Tokenizer.from_pretrained(STORIES)
    float_model = load_model(STORIES, dtype="float32", device="cpu")
    stories = generate(float_model, [tokenizer.encode(p) for p in PROMPTS], max_new_tokens=180)
    texts = [tokenizer.encode(p) + s for p, s in zip(PROMPTS, stories)]
    bf16 = prompt_logits(load_model(STORIES, dtype="bfloat16", device="cpu"), texts)
    int8 = prompt_logits(load_model(STORIES, dtype="bfloat16", device="cpu", quantization="int8"), texts)
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(bf16, int8))
    total = sum(len(ids) for ids in texts)
    print(f"stories260K INT8 vs bf16 top-1: {agree}/{total}")
    assert total >= 512
    assert agree / total >= 0.97, f"INT8 argmax agreement {agree}/{total}"
