"""Tool calls: DeepSeek's tool-call markup in the output becomes OpenAI `tool_calls`, whole or streamed.

The server test uses a scripted checkpoint: a real Llama safetensors checkpoint whose weights
make greedy decoding follow a fixed chain of tokens (one-hot embeddings, layers that add
nothing, an lm_head that maps each token to its successor), so the model "decides" to think,
answer and call a tool exactly as written below. transformers' greedy decoding of the same
checkpoint checks the script.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
import torch

from server_fixture import MODEL_NAME, running_server
from xpuserve.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallParser, split_tool_calls

ARGS = '{"city": "Paris", "unit": "C"}'
V3_CALL = f"{CALL_BEGIN}function{SEP}get_weather\n```json\n{ARGS}\n```{CALL_END}"
V31_CALL = f'{CALL_BEGIN}get_time{SEP}{{"zone": "UTC"}}{CALL_END}'
OUTPUT = f"Let me check.{CALLS_BEGIN}{V3_CALL}{V31_CALL}{CALLS_END}"


def test_a_cut_off_call_and_text_after_the_calls_are_not_content():
    cut = f"Let me check.{CALLS_BEGIN}{V3_CALL}{V31_CALL[:-12]}"
    content, calls = split_tool_calls(cut)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert split_tool_calls(f"A{CALLS_BEGIN}{V31_CALL}{CALLS_END} trailing")[0] == "A"


def test_both_formats_split_whole():
    content, calls = split_tool_calls(OUTPUT)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", json.loads(ARGS)), ("get_time", {"zone": "UTC"})]
    assert calls[0].id != calls[1].id
    assert split_tool_calls("no tools here < | >") == ("no tools here < | >", [])


@pytest.mark.parametrize("seed", range(5))
def test_streamed_in_random_pieces_equals_whole(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(OUTPUT)), 12))
    parser, content, calls = ToolCallParser(), "", []
    for a, b in zip([0, *cuts], [*cuts, len(OUTPUT)]):
        text, new = parser.feed(OUTPUT[a:b])
        assert CALLS_BEGIN[:2] not in text  # no marker leaks into content, even half of one
        content, calls = content + text, calls + new
    content += parser.finish()
    whole_content, whole_calls = split_tool_calls(OUTPUT)
    assert content == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


# ---- through the server ----

SCRIPT = ["ok", "</think>", "Sure.", CALLS_BEGIN, CALL_BEGIN, "function", SEP, "get_weather", "\n```json\n", ARGS,
          "\n```", CALL_END, CALLS_END, "</s>"]  # what the model writes after the chat prompt, token by token
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]


def write_scripted_checkpoint(path) -> list[int]:
    """A Llama checkpoint and tokenizer whose greedy output after '<assistant>' is SCRIPT; returns its token ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    pieces = ["<assistant>", "<user>", "<tools>", *SCRIPT]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces + [chr(c) for c in range(0x20, 0x7F)]))}
    size = -(-len(vocab) // 8) * 8
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces if p != "</s>"])
    tokenizer.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    tokenizer.save(str(path / "tokenizer.json"))
    # Like R1's template: an assistant turn that only called tools has content None; V3.1-like
    # `thinking: false` closes the thought in the prompt.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and m['content'] is none %}"
                "<assistant>{{ m['tool_calls'][0]['function']['name'] }}{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}"
                "{% endfor %}{% if tools %}<tools>{% endif %}{% if add_generation_prompt %}<assistant>"
                "{% if thinking is defined and not thinking %}</think>{% endif %}{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))

    eos = vocab["</s>"]
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=256, eos_token_id=eos, bos_token_id=eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    successor = torch.full((size,), eos)
    chain = [vocab["<assistant>"]] + [vocab[p] for p in SCRIPT]
    successor[chain[:-1]] = torch.tensor(chain[1:])
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(size))
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # the layer adds nothing to the one-hot stream
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[successor, torch.arange(size)] = 1.0
    model.save_pretrained(path)
    out = model.generate(torch.tensor([[vocab["<user>"], vocab["<assistant>"]]]), max_new_tokens=len(SCRIPT) + 2, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
    assert out[0, 2:].tolist() == chain[1:]  # transformers follows the script too
    return chain[1:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted")
    write_scripted_checkpoint(path)
    with running_server(path) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_chat_returns_reasoning_content_and_the_tool_call(server):
    response = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == "ok"
    assert choice.message.content == "Sure."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == json.loads(ARGS)
    assert call.id.startswith("call_")


def test_streamed_tool_call_equals_the_whole_one(server):
    whole = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0).choices[0]
    content = reasoning = ""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": call.id})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, reasoning, finish) == ("Sure.", "ok", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(whole.message.tool_calls[0].function.name,
                                                                      whole.message.tool_calls[0].function.arguments)]


def test_without_tools_or_with_tool_choice_none_the_markup_stays_text(server):
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        choice = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, **extra).choices[0]
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.content.startswith("Sure." + CALLS_BEGIN)


def test_forcing_a_tool_is_refused_clearly(server):
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required")


def test_a_call_cut_by_max_tokens_keeps_length_and_leaks_no_markup(server):
    for stream in (False, True):
        kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=10)
        if stream:
            chunks = list(server.chat.completions.create(**kwargs, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
            called = any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        else:
            choice = server.chat.completions.create(**kwargs).choices[0]
            content, finish, called = choice.message.content, choice.finish_reason, bool(choice.message.tool_calls)
        assert (content, finish, called) == ("Sure.", "length", False), stream


def test_the_second_turn_sends_the_call_back_with_content_none(server):
    """The OpenAI tool loop: the assistant's tool-call message (content null) and the tool's result go back."""
    first = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0).choices[0].message
    assert first.content == "Sure."
    call = first.tool_calls[0]
    turn = [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    reply = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES + turn, tools=TOOLS, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls"  # the script calls again; the point is that it rendered
    url = str(server.base_url).removesuffix("/v1/")
    tokens = httpx.post(url + "/tokenize", json={"messages": MESSAGES + turn}).json()["tokens"]
    detokenized = httpx.post(url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "<assistant>get_weather<tool>18C" in detokenized


def test_a_prompt_that_closed_the_thought_gets_content_and_calls(server):
    """V3.1's non-thinking mode: the template ends the prompt with </think>, so nothing is reasoning."""
    choice = server.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=0,
                                            extra_body={"chat_template_kwargs": {"thinking": False}}).choices[0]
    assert choice.message.content == "Sure." and choice.message.model_extra["reasoning_content"] == ""
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
