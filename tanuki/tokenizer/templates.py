"""Chat templates written into ``tokenizer_config.json``.

Hugging Face renders ``chat_template`` with Jinja's ``trim_blocks=True, lstrip_blocks=True``, which
would eat a newline written right after a ``{% ... %}`` tag. The templates therefore emit every
newline from a string expression (``{{ '\\n\\n### 指示:\\n' }}``), never as literal template text.
"""

from __future__ import annotations

#: The fixed system sentence of the Japanese Alpaca format (llm-jp-3 instruct, Tanuki-8B).
JAPANESE_ALPACA_SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"

#: Japanese Alpaca (llm-jp-3 instruct; Tanuki-8B uses the same prompt format):
#:   BOS, then the fixed system sentence if there is a system message (its content is ignored, as in
#:   llm-jp-3), each user turn as "\n\n### 指示:\n" + content, each assistant turn as
#:   "\n\n### 応答:\n" + content + EOS, and "\n\n### 応答:\n" as the generation prompt.
JAPANESE_ALPACA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '" + JAPANESE_ALPACA_SYSTEM + "' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '\\n\\n### 指示:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '\\n\\n### 応答:\\n' }}"
    "{% endif %}"
)

#: the template a freshly built tokenizer carries
DEFAULT_CHAT_TEMPLATE = JAPANESE_ALPACA_TEMPLATE
