"""The bundled demo model: its data, its files, and its answers through the engine and through transformers."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import pytest
import torch

from xpuserve import LLM, SamplingParams
from xpuserve.config import ModelConfig
from xpuserve.demo import MODEL_DIR, data
from xpuserve.demo.train import TrainSettings, parse_answer, train
from xpuserve.tokenizer import Tokenizer

NUM_PROBLEMS = 200
GREEDY = SamplingParams(temperature=0, max_tokens=64)


@pytest.fixture(scope="module")
def problems() -> list[tuple[data.Problem, str]]:
    """200 held-out problems, typed with and without spaces."""
    rng = random.Random(5)
    return [(p, data.user_message(p, rng)) for p in data.held_out()[:NUM_PROBLEMS]]


def conversation(message: str) -> list[dict]:
    return [{"role": "user", "content": message}]


def accuracy(llm: LLM, problems) -> float:
    outputs = llm.chat([conversation(m) for _, m in problems], GREEDY)
    answers = [parse_answer(o.outputs[0].text) for o in outputs]
    assert all("</think>" in o.outputs[0].text for o in outputs)
    return sum(a == str(p.answer) for a, (p, _) in zip(answers, problems)) / len(problems)


def test_data_is_deterministic():
    assert data.held_out() == data.held_out()
    assert list(islice(data.training_stream(), 100)) == list(islice(data.training_stream(), 100))
    assert list(islice(data.training_stream(seed=1), 100)) != list(islice(data.training_stream(), 100))


def test_held_out_is_never_trained_on():
    held_out = data.held_out()
    assert len(set(held_out)) == len(held_out) == data.HELD_OUT_SIZE
    seen = {p for p, _ in islice(data.training_stream(), 200_000)}
    assert not seen & set(held_out)


def test_thought_works_column_by_column():
    assert data.assistant_text(data.Problem(745, "-", 292)) == (
        "<think>\n745-292\n5-2-0=03|4-9-0=15|7-2-1=04|\n</think>\n\n453"
    )
    assert data.thought(data.Problem(999, "+", 999)).endswith("9+9+1=19|")
    rng = random.Random(0)
    for _ in range(1000):
        p = data.random_problem(rng)
        assert 0 <= p.b <= 999 and 0 <= p.a <= 999 and p.answer >= 0
        assert len(data.thought(p)) == 8 + 3 * 9


def test_files_are_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 5 * 1024 * 1024


def test_config_is_r1_shaped():
    config = ModelConfig.from_pretrained(MODEL_DIR)
    assert config.architecture == "DeepseekV3ForCausalLM"
    assert config.q_lora_rank is not None and config.kv_lora_rank > 0  # MLA with q LoRA
    assert config.n_routed_experts >= 4 and config.n_shared_experts == 1
    assert config.n_group >= 2 and config.topk_group == 1
    assert config.n_routed_experts // config.n_group >= 4  # routing chooses within a group
    assert config.topk_method == "noaux_tc" and config.scoring_func == "sigmoid"
    assert config.first_k_dense_replace == 1 and not config.is_moe_layer(0) and config.is_moe_layer(1)


def test_chat_template_renders_r1_format():
    tokenizer = Tokenizer.from_pretrained(MODEL_DIR)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n3"},
        {"role": "user", "content": "7 - 4"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>1+2<｜Assistant｜>3<｜end▁of▁sentence｜>"
        "<｜User｜>7 - 4<｜Assistant｜><think>\n"
    )
    ids = tokenizer.encode("<think></think>", add_special_tokens=False)
    assert len(ids) == 2 and tokenizer.decode(ids) == "<think></think>"  # single tokens, kept in text


def test_default_llm_is_the_demo_model_and_answers(problems):
    llm = LLM(device="cpu")
    assert llm.engine.config.model == str(MODEL_DIR)
    assert accuracy(llm, problems) >= 0.95


def test_accuracy_holds_under_preemption_and_chunked_prefill(problems):
    per_token = LLM(MODEL_DIR, device="cpu").engine.worker.kv_bytes_per_token
    # 256 tokens of cache for 200 sequences of about 60 tokens; prompts split into chunks of at most 64 tokens.
    llm = LLM(MODEL_DIR, device="cpu", block_size=4, kv_cache_memory=256 * per_token, max_num_batched_tokens=64)
    assert accuracy(llm, problems) >= 0.95
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.hit_tokens > 0


def test_int8_accuracy_within_two_points_of_bf16(problems):
    bf16 = accuracy(LLM(MODEL_DIR, device="cpu", dtype="bfloat16"), problems)
    llm = LLM(MODEL_DIR, device="cpu", dtype="bfloat16", quantization="int8")
    assert llm.engine.model.serving_format.weights.kind == "int8"
    int8 = accuracy(llm, problems)
    print(f"demo model accuracy on {len(problems)} held-out: bf16 {bf16:.3f}, int8 {int8:.3f}")
    assert bf16 >= 0.9 and abs(int8 - bf16) <= 0.02


def test_transformers_agrees(problems):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    chosen = problems[:5]
    ours = LLM(MODEL_DIR, device="cpu").chat([conversation(m) for _, m in chosen], GREEDY)
    for (_, message), out in zip(chosen, ours):
        prompt = tokenizer.apply_chat_template(conversation(message), add_generation_prompt=True, return_tensors="pt")
        prompt = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
        assert prompt[0].tolist() == out.prompt_token_ids
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=64,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )
        assert generated[0, prompt.shape[1]:].tolist() == out.outputs[0].token_ids
        assert tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True) == out.outputs[0].text


def test_http_server_splits_thought_and_answer(problems):
    openai = pytest.importorskip("openai")
    from server_fixture import MODEL_NAME, running_server

    chosen = problems[:50]
    with running_server(MODEL_DIR) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(message: str):
            response = client.chat.completions.create(
                model=MODEL_NAME, messages=conversation(message), temperature=0, max_tokens=64
            )
            return response.choices[0].message

        with ThreadPoolExecutor(len(chosen)) as pool:  # all 50 at once
            replies = list(pool.map(ask, [m for _, m in chosen]))
    for (problem, _), reply in zip(chosen, replies):
        assert reply.model_extra["reasoning_content"].strip().startswith(f"{problem.a:03d}{problem.op}{problem.b:03d}\n")
    correct = sum(reply.content == str(problem.answer) for (problem, _), reply in zip(chosen, replies))
    assert correct >= 0.95 * len(chosen)


def test_training_is_reproducible():
    settings = TrainSettings(steps=3, batch_size=4, warmup=1, log_every=100)
    first, _ = train(settings, log=lambda _: None)
    second, _ = train(settings, log=lambda _: None)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
