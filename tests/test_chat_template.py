"""Chat templates rendered by rsdjax (jinja2 sandbox) against transformers' `apply_chat_template`, token
for token: SmolLM2's ChatML template and the public Llama-3.1-Instruct template; the SFT loss mask
against transformers' own assistant mask (`{% generation %}` blocks); templates that fail."""
import shutil

import pytest

# Meta's Llama-3.1-Instruct template (tokenizer_config.json of meta-llama/Llama-3.1-8B-Instruct), the
# tool branches cut to what a plain conversation reaches.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# ChatML with transformers' assistant-mask markers around what the model must learn to say
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

SYSTEM = {"role": "system", "content": "  You are terse.  "}
TURNS = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "Tell me a fact about 日本."}, {"role": "assistant", "content": " Tokyo is big. "}]


def _pair(directory, template=None):
    """(rsdjax Tokenizer, transformers tokenizer) over the same files."""
    from transformers import AutoTokenizer

    from rsdjax.tokenizer import Tokenizer

    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def llama31_dir(tiny_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama31_tok")
    shutil.copytree(tiny_tokenizer_dir, d, dirs_exist_ok=True)
    return d


@pytest.fixture(scope="module")
def smol_tok_dir(smollm2_hf_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol_tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_hf_dir / name, d / name)
    return d


@pytest.mark.parametrize("which", ["smollm2", "llama3.1"])
def test_render_equals_transformers(which, smol_tok_dir, llama31_dir):
    ours, ref = _pair(smol_tok_dir) if which == "smollm2" else _pair(llama31_dir, LLAMA31_TEMPLATE)
    for messages in ([TURNS[0]], [SYSTEM, TURNS[0]], TURNS, [SYSTEM] + TURNS):
        for gen in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
            assert ours.render_chat(messages, gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)


def test_sft_mask_is_exactly_the_assistant_tokens(smol_tok_dir, tmp_path):
    """Our mask (derived by rendering, SmolLM2's template has no markers) equals transformers' mask from
    the same conversation under a marked ChatML template that renders identically."""
    from rsdjax.sft.data import encode

    ours, _ = _pair(smol_tok_dir)
    marked = tmp_path / "marked"
    shutil.copytree(smol_tok_dir, marked)
    _, ref = _pair(marked, CHATML_WITH_GENERATION)
    messages = [SYSTEM] + TURNS
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = ours.chat_ids_and_mask(messages)
    assert ids == out["input_ids"]
    assert [bool(m) for m in mask] == [bool(m) for m in out["assistant_masks"]]
    assert sum(mask) > 10
    ex = encode(ours, messages, "chat")  # what fine-tuning trains on: targets under the mask
    assert ex.loss_mask.tolist() == mask[1:] and ex.targets.tolist() == ids[1:]


def test_llama3_format_for_rsdjax_tokenizers(tiny_tokenizer_dir, tmp_path):
    """rsdjax-trained tokenizers carry the Llama-3 template; saved, it is what transformers renders too."""
    from rsdjax.chat import LLAMA3_TEMPLATE
    from rsdjax.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_tokenizer_dir)
    assert tok.template_source() == LLAMA3_TEMPLATE
    tok.save(tmp_path / "saved")
    ours, ref = _pair(tmp_path / "saved")
    want = ref.apply_chat_template(TURNS, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(TURNS, add_generation_prompt=False) == want
    ids, mask = ours.chat_ids_and_mask(TURNS)
    eot = ours.token_id("<|eot_id|>")
    assert [i for i, m in zip(ids, mask) if m].count(eot) == 2  # each answer's end-of-turn is learned


def test_bad_templates_and_missing_template_fail_clearly(tiny_hf_dir, smol_tok_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from rsdjax.chat import ChatTemplate, ChatTemplateError
    from rsdjax.tokenizer import Tokenizer, TokenizerError

    raising = ChatTemplate("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="the template raised: no system role"):
        raising.render([SYSTEM])
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        ChatTemplate("{% for %}")
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(smol_tok_dir / "tokenizer.json", plain / "tokenizer.json")  # no config, no template
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.load(plain).apply_chat_template([TURNS[0]])
    model = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, model)
    shutil.copy(smol_tok_dir / "tokenizer.json", model / "tokenizer.json")
    (model / "chat_template.jinja").write_text("{{ raise_exception('this model has no chat format') }}")
    proc = subprocess.run([sys.executable, "-m", "rsdjax.cli", "generate", "--model", str(model), "--chat",
                           "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "this model has no chat format" in lines[0], proc.stderr
