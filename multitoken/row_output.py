"""One row's output as decoding steps commit tokens: the tokens kept, and when and why the row ends.

A row ends at the EOS token (not kept), after a stop string (kept, and nothing after it), or after
`max_new_tokens`. `generate()` keeps one per prompt; the server keeps one per request.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class RowOutput:
    """Tokens of one row, cut at EOS or a stop string; `done` once the row needs no more steps."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_id: int | None = None,
        stop_strings: Sequence[str] | None = None,
        tokenizer=None,
        keep_logits: bool = False,
    ) -> None:
        self.tokens: list[int] = []
        self.logits: list[Tensor] = []
        self.reason = "length"
        """"eos", "stop" (a stop string appeared; it is kept) or "length"."""
        self.done = max_new_tokens == 0
        self.generated = 0
        """Tokens generated, a final EOS included."""
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id
        self.stop_strings, self.tokenizer = list(stop_strings or []), tokenizer
        self.keep_logits = keep_logits

    @property
    def budget(self) -> int:
        """Most tokens the next step may commit for this row (0 once it is done)."""
        return 0 if self.done else self.max_new_tokens - len(self.tokens)

    def add(self, new: list[int], logits_TV: Tensor | None = None) -> list[int]:
        """Append a step's tokens, cut at EOS or a stop string; returns the tokens kept."""
        hit_eos = self.eos_id is not None and self.eos_id in new
        if hit_eos:
            new = new[: new.index(self.eos_id)]
        kept = self._cut_at_stop(new) if self.stop_strings and new else None
        if kept is not None:
            new = new[:kept]
            self.done, self.reason = True, "stop"
        elif hit_eos:
            self.done, self.reason = True, "eos"
            self.generated += 1
        self.generated += len(new)
        self.tokens.extend(new)
        if self.keep_logits and logits_TV is not None:
            self.logits.append(logits_TV[: len(new)].float().cpu())
        if len(self.tokens) >= self.max_new_tokens:
            self.done = True
        return new

    def _cut_at_stop(self, new: list[int]) -> int | None:
        """Number of `new` tokens to keep so the text ends with the first stop string, or None.

        Only the old text's last characters can start a stop string that the new tokens complete, so
        only the last `STOP_CONTEXT_PER_CHAR * longest + STOP_CONTEXT_SLACK` old tokens are decoded (a
        character is at most 4 bytes, a token at least one): a row's check costs what its new tokens
        do, not its whole text again.
        """
        longest = max(len(s) for s in self.stop_strings)
        context = self.tokens[-(STOP_CONTEXT_PER_CHAR * longest + STOP_CONTEXT_SLACK) :]
        start = max(len(self.tokenizer.decode(context)) - longest, 0)
        if not any(s in self.tokenizer.decode(context + new)[start:] for s in self.stop_strings):
            return None
        for kept in range(1, len(new) + 1):
            if any(s in self.tokenizer.decode(context + new[:kept])[start:] for s in self.stop_strings):
                return kept
        return len(new)


STOP_CONTEXT_PER_CHAR = 4
"""Old tokens decoded per character of the longest stop string (UTF-8 needs at most 4 bytes)."""
STOP_CONTEXT_SLACK = 4
"""Extra old tokens, so the context starts with whole characters before the ones that matter."""


__all__ = ["RowOutput"]
