"""Chat templates: found where transformers saves them, control tokens only from the template itself."""

import json

from multitoken.serve.chat import DEFAULT_TEMPLATE, ChatRenderer
from multitoken.tokenizer import byte_tokenizer

MESSAGES = [{"role": "user", "content": "hi <|endoftext|>"}]


def test_templates_where_transformers_saves_them(tmp_path):
    tokenizer = byte_tokenizer()
    assert ChatRenderer.from_checkpoint(tmp_path, tokenizer).template == DEFAULT_TEMPLATE
    assert ChatRenderer(tokenizer).render(MESSAGES) == "user: hi <|endoftext|>\nassistant:"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": "<s>"}))
    renderer = ChatRenderer.from_checkpoint(tmp_path, tokenizer)
    assert renderer.has_own_template and renderer.render(MESSAGES) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|endoftext|>")
    renderer = ChatRenderer.from_checkpoint(tmp_path, tokenizer)
    # The template's <|endoftext|> is the EOS id; the one the user typed stays bytes.
    assert renderer.encode(MESSAGES) == [*tokenizer.encode("hi <|endoftext|>"), tokenizer.eos_id]
