"""xpuserve's forward pass and greedy generation equal transformers' on the same checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from oracle import ARCHITECTURES, make_checkpoint, random_prompts, reference_logits
from xpuserve.generate import generate, prompt_logits
from xpuserve.models.mla import MLAttention
from xpuserve.weights import load_model

MLA_ARCHS = [a for a in ARCHITECTURES if a.startswith("v")]
LENGTHS = [1, 7, 23, 40]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = make_checkpoint(request.param, path, seed=1)
    return request.param, path, reference


def set_mla_mode(model, mode: str) -> None:
    for attn in model.attention_layers():
        if isinstance(attn, MLAttention):
            attn.mode = mode


def relative_error(ours: list[torch.Tensor], reference, prompts) -> float:
    errors = []
    for logits, prompt in zip(ours, prompts):
        ref = reference_logits(reference, prompt)
        errors.append(((logits - ref).abs().max() / ref.abs().max()).item())
    return max(errors)


def test_float32_logits_match(arch):
    """Prompts of several lengths in one packed batch; MLA both expanded and absorbed."""
    name, path, reference = arch
    model = load_model(path, dtype="float32", device="cpu")
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=2)
    for mode in ["expanded", "absorb"] if name in MLA_ARCHS else ["expanded"]:
        set_mla_mode(model, mode)
        assert relative_error(prompt_logits(model, prompts), reference, prompts) <= 1e-4, mode


@torch.no_grad()
def test_reference_is_not_trivial(arch):
    """With the re-drawn weights the oracle's predictions vary and every layer changes them,
    so matching it means something."""
    _, _, reference = arch
    prompt = torch.tensor(random_prompts([40], reference.config.vocab_size, seed=3))
    predictions = reference(prompt).logits[0].argmax(-1)
    assert len(set(predictions.tolist())) >= 8
    assert (predictions != prompt[0]).float().mean() > 0.9  # not echoing the input
    for layer in reference.model.layers:
        handle = layer.register_forward_hook(lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        try:
            without_layer = reference(prompt).logits[0].argmax(-1)
        finally:
            handle.remove()
        assert (without_layer != predictions).float().mean() > 0.3


def test_bfloat16_is_as_close_as_transformers(arch):
    """bf16 error against the float32 oracle is no larger than transformers' own bf16 error.

    Random weights give flat next-token distributions (top-2 logits often within bf16 noise:
    transformers' own bf16 run agrees with float32 on only 90-98% of positions here), so the
    99% argmax agreement is asserted on trained weights (test_real_weights.py); here logits
    error and argmax agreement are compared with transformers' bf16 run of the same model.
    """
    name, path, reference = arch
    model = load_model(path, dtype="bfloat16", device="cpu")
    prompts = random_prompts([64, 100, 17, 120], model.config.vocab_size, seed=4)
    exact = [reference_logits(reference, p) for p in prompts]
    ours = torch.cat(prompt_logits(model, prompts))
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    theirs = torch.cat([reference_logits(reference_bf16, p) for p in prompts])
    exact = torch.cat(exact)
    our_error, their_error = (ours - exact).abs().mean(), (theirs - exact).abs().mean()
    assert our_error <= 1.25 * their_error, f"{name}: mean |dlogit| {our_error:.4f} vs transformers {their_error:.4f}"
    ours_right = (ours.argmax(-1) == exact.argmax(-1)).float().mean()
    theirs_right = (theirs.argmax(-1) == exact.argmax(-1)).float().mean()
    assert ours_right >= theirs_right - 0.03, f"{name}: bf16 argmax {ours_right:.3f} vs transformers {theirs_right:.3f}"


def test_greedy_generation_matches(arch):
    name, path, reference = arch
    model = load_model(path, dtype="float32", device="cpu")
    prompts = random_prompts([5, 12, 3], model.config.vocab_size, seed=5)
    eos = model.config.eos_token_id
    ours = generate(model, prompts, max_new_tokens=32, stop_token_ids=eos)
    for prompt, tokens in zip(prompts, ours):
        expected = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=32, eos_token_id=eos, pad_token_id=0,
        )[0, len(prompt):].tolist()
        assert tokens == expected, name
    assert any(len(t) == 32 for t in ours)  # at least one ran the whole way without an early eos
