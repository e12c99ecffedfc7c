"""Chat templates against transformers' apply_chat_template, and hostile templates refused by the sandbox."""

import json
import shutil
from pathlib import Path

import pytest

from xpuserve.tokenizer import ChatTemplateError, Tokenizer

from oracle import STORIES
if not STORIES.is_dir():
    pytest.skip(f"{STORIES} is absent (shared test model)", allow_module_level=True)

# DeepSeek-R1's published chat_template (tokenizer_config.json), split into lines only for reading.
R1_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    r"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    r"{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- else %}"
    r"{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    r"{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi 世界 🙂"}],
    "system_user": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
    "two_systems": [
        {"role": "system", "content": "First."},
        {"role": "system", "content": "Second."},
        {"role": "user", "content": "Go"},
    ],
    "multi_turn": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?\nplease"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL, TOOL_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
        {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."},
        {"role": "user", "content": "thanks"},
    ],
    "ends_with_tool": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "sunny"},
    ],
}
R1_SPECIALS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}


def _model_dir(path: Path, template: str | None, jinja_file: str | None = None, **config) -> Path:
    shutil.copy(STORIES / "tokenizer.json", path / "tokenizer.json")
    spec = {**json.loads((STORIES / "tokenizer_config.json").read_text()), **config}
    if template is not None:
        spec["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(spec, ensure_ascii=False))
    if jinja_file is not None:
        (path / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("r1"), R1_TEMPLATE, **R1_SPECIALS)


def _reference(path: Path):
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(path)


def test_r1_generation_prompt(r1_dir):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi 世界"}]
    text = Tokenizer.from_pretrained(r1_dir).apply_chat_template(messages)
    assert text == "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi 世界<｜Assistant｜><think>\n"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_r1_template_matches_transformers(r1_dir, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = Tokenizer.from_pretrained(r1_dir).apply_chat_template(messages, add_generation_prompt)
    ref = _reference(r1_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref


def test_given_template_and_filters_match_transformers(tmp_path):
    model_dir = _model_dir(tmp_path, None)
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ bos_token }}{{ eos_token }}{{ unk_token }}|{{ m | tojson }}|{{ m.content | tojson(indent=2) }}\n"
        "{% endfor %}{{ tools | tojson }}{{ extra }}"
    )
    messages = [{"role": "user", "content": 'quote " <tag> & é 世界'}, {"role": "assistant", "content": "x"}] * 2
    ours = Tokenizer.from_pretrained(model_dir).apply_chat_template(messages, chat_template=template, extra="!")
    ref = _reference(model_dir).apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, extra="!"
    )
    assert ours == ref and "é 世界" in ours


def test_chat_template_jinja_file_wins(tmp_path):
    model_dir = _model_dir(tmp_path, "from config", jinja_file="from file: {{ messages[0].content }}")
    ours = Tokenizer.from_pretrained(model_dir).apply_chat_template([{"role": "user", "content": "hi"}])
    assert ours == _reference(model_dir).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert ours == "from file: hi"


def test_missing_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_pretrained(STORIES).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_become_chat_template_errors(r1_dir):
    tok = Tokenizer.from_pretrained(r1_dir)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(user, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="failed"):
        tok.apply_chat_template(user, chat_template="{% if %}")
    with pytest.raises(ValueError):  # ChatTemplateError is a ValueError: a bad request, not a server fault
        tok.apply_chat_template([{"role": "user"}])


HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ ''['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__.__base__}'.format('') }}",
    "{{ '{x.__class__}'.format_map({'x': ''}) }}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "{{ messages[0].update({'content': 'injected'}) }}",
    "{{ dict.mro() }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_are_refused(r1_dir, tmp_path, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer.from_pretrained(r1_dir)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="refused"):
        tok.apply_chat_template(messages, chat_template=template.replace("MARKER", str(tmp_path / "pwned")))
    assert not (tmp_path / "pwned").exists()
    assert messages == [{"role": "user", "content": "hi"}]
    # The process is unharmed: the model's own template still renders.
    assert tok.apply_chat_template(messages).endswith("<｜User｜>hi<｜Assistant｜><think>\n")
