"""Chat conversations rendered into training text with a checkpoint's chat template.

A JSONL source whose field holds a list of messages (`{"messages": [{"role": "user", "content": ...},
...]}`, selected as `--source chats.jsonl:messages`) is rendered one conversation per document by
`transformers`' `apply_chat_template`, from the `chat_template` of the `tokenizer_config.json` next to
the tokenizer `prepare --tokenizer` names (what `multitoken import` carries into a checkpoint). The
template's special tokens (`<|im_start|>`, ...) become their ids, as transformers tokenizes a rendered
chat; in plain documents special-token strings stay text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from multitoken.errors import UserError

ChatRenderer = Callable[[list], str]


class ChatText(str):
    """A conversation rendered by a chat template: its special-token strings are tokenized as specials."""


TOKENIZER_CONFIG = "tokenizer_config.json"


def is_chat(value: object) -> bool:
    """A list of {role, content} messages."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def tokenizer_dir(spec: str) -> Path | None:
    """The directory holding the tokenizer `prepare --tokenizer SPEC` loads (a run, a checkpoint, a
    tokenizer.json's folder); None for the built-in ones (bpe, byte)."""
    if spec in ("bpe", "byte"):
        return None
    path = Path(spec)
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "tokenizer.json").is_file():
        from multitoken.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(path)
    return path if path.is_dir() else path.parent


def chat_renderer(tokenizer_spec: str) -> ChatRenderer | None:
    """A function rendering a conversation with the tokenizer's chat template; None when it has none."""
    folder = tokenizer_dir(tokenizer_spec)
    if (
        folder is None
        or not (folder / TOKENIZER_CONFIG).is_file()
        or not (folder / "tokenizer.json").is_file()
    ):
        return None
    try:
        template = json.loads((folder / TOKENIZER_CONFIG).read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{folder / TOKENIZER_CONFIG} is not valid JSON") from None
    if not template:
        return None
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))

    def render(messages: list) -> str:
        try:
            return ChatText(hf_tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as err:  # jinja2's errors: a template that cannot render these messages
            raise UserError(f"the chat template cannot render a conversation: {err}") from None

    return render


def no_template_error(where: str, tokenizer_spec: str) -> UserError:
    return UserError(
        f"{where} holds chat messages, but the tokenizer {tokenizer_spec} has no chat template: prepare with "
        "--tokenizer CHECKPOINT whose tokenizer_config.json has a chat_template"
    )
