"""Chat messages to prompt token ids: the checkpoint's chat template when it has one, else a plain one.

An imported model carries its template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`, as transformers saves it); it is rendered by
transformers' own jinja renderer, as `tokenizer.apply_chat_template` would. The template writes control
tokens such as `<|im_start|>` as text; those become their token ids, while the same strings inside a
message's content stay plain text, so a user cannot forge a turn (transformers marks them the same way).

Without a template, messages are rendered as `DEFAULT_TEMPLATE`: one `role: content` line per message,
then `assistant:` for the model to continue.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from multitoken.errors import UserError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The template of checkpoints without one: `role: content` lines, then `assistant:`."""

_START, _END = "\ue000", "\ue001"  # private-use characters around control tokens from message content


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatRenderer:
    """Renders messages with one template and encodes the result with the checkpoint's tokenizer."""

    def __init__(self, tokenizer, template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.template = template or DEFAULT_TEMPLATE
        self.has_own_template = template is not None
        self.special_tokens = special_tokens or {}
        added = tokenizer.hf.get_added_tokens_decoder() if hasattr(tokenizer, "hf") else {}
        self.control_ids = {token.content: i for i, token in added.items()}
        longest_first = sorted(self.control_ids, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.marked_re = re.compile(f"{_START}({self.control_re.pattern}){_END}|[{_START}{_END}]")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tokenizer) -> ChatRenderer:
        """The renderer of a checkpoint: its template if it has one, where transformers keeps it
        (`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`)."""
        path = Path(directory) / "tokenizer_config.json"
        jinja = Path(directory) / "chat_template.jinja"
        config: dict = {}
        try:
            if path.is_file():
                config = json.loads(path.read_text(encoding="utf-8"))
            if jinja.is_file():
                config["chat_template"] = jinja.read_text(encoding="utf-8")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the chat template of {directory}: {err}") from err
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        specials = {
            name: text
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(name))) is not None
        }
        return cls(tokenizer, template if isinstance(template, str) else None, specials)

    def render(self, messages: list[dict]) -> str:
        """The prompt text, with an assistant turn opened."""
        return self._render_marked(messages).replace(_START, "").replace(_END, "")

    def _render_marked(self, messages: list[dict]) -> str:
        """The prompt text, with the control tokens that came from message content marked."""
        from transformers.utils.chat_template_utils import render_jinja_template

        marked = [{k: self._mark(v) for k, v in m.items()} for m in messages]
        rendered, _ = render_jinja_template(
            conversations=[marked],
            chat_template=self.template,
            add_generation_prompt=True,
            **self.special_tokens,
        )
        return rendered[0]

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered prompt: the template's control tokens as ids, content as text."""
        pieces = self.marked_re.split(self._render_marked(messages))
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2 == 1:  # a control token that came from a message: plain text
                ids += self.tokenizer.encode(piece)
                continue
            last = 0
            for match in self.control_re.finditer(piece):
                ids += self.tokenizer.encode(piece[last : match.start()]) if match.start() > last else []
                ids.append(self.control_ids[match.group(0)])
                last = match.end()
            ids += self.tokenizer.encode(piece[last:]) if last < len(piece) else []
        return ids

    def _mark(self, value):
        if isinstance(value, str):
            value = value.replace(_START, "").replace(_END, "")
            return self.control_re.sub(f"{_START}\\g<0>{_END}", value)
        if isinstance(value, list):
            return [self._mark(v) for v in value]
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        return value
