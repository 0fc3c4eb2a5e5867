"""Minimal-pair probes in Jason Wei's style: does the model prefer the correct continuation of a prefix?

A probe file is JSONL, one object per line:

    {"family": "closing bracket", "prefix": "print(len(xs)", "correct": ")", "distractor": "]"}

Each continuation is scored by its log-probability under the next-token head, summed over its tokens;
a pair counts as right when the correct continuation scores higher. Blank lines and lines starting
with `#` are skipped. Built-in sets: `multitoken/studies/corpora/probe_sets/code.jsonl` and `english.jsonl`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from multitoken.errors import UserError

FIELDS = ("family", "prefix", "correct", "distractor")


@dataclass
class Probe:
    """One minimal pair."""

    family: str
    """Which phenomenon it tests, e.g. "closing bracket"."""
    prefix: str
    """Context given to the model."""
    correct: str
    """The continuation a competent model should prefer."""
    distractor: str
    """The wrong continuation."""
    where: str
    """FILE:LINE it came from, for error messages."""


@dataclass
class ProbeResult:
    """Scores of one probe."""

    probe: Probe
    """The pair."""
    logp_correct: float
    """Summed log-probability (nats) of the correct continuation."""
    logp_distractor: float
    """Summed log-probability (nats) of the distractor."""

    @property
    def right(self) -> bool:
        return self.logp_correct > self.logp_distractor


def parse_probes(text: str, name: str) -> list[Probe]:
    """Probes from JSONL text; UserError naming the line of any malformed record."""
    probes = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise UserError(f"probe file {where} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"probe file {where} must be a JSON object with {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise UserError(f"probe file {where} lacks string field(s) {', '.join(missing)}")
        if not record["correct"] or not record["distractor"] or record["correct"] == record["distractor"]:
            raise UserError(f"probe file {where}: correct and distractor must be different non-empty strings")
        probes.append(Probe(*(record[f] for f in FIELDS), where=where))
    if not probes:
        raise UserError(f"probe file {name} holds no probes")
    return probes


def load_probes(path: str | Path) -> list[Probe]:
    """Probes from a JSONL file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"probe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read probe file {path}: {err}") from None
    return parse_probes(text, str(path))


def builtin_probes(domain: str) -> list[Probe]:
    """The shipped probe set for `code` or `text` (English)."""
    name = "code.jsonl" if domain == "code" else "english.jsonl"
    text = (
        resources.files("multitoken.studies.corpora").joinpath("probe_sets", name).read_text(encoding="utf-8")
    )
    return parse_probes(text, f"probes/{name}")


def encode_pair(tokenizer, prefix: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prefix ids, continuation ids): the joint encoding split at the prefix when it starts with it."""
    context = tokenizer.encode(prefix)
    whole = tokenizer.encode(prefix + continuation)
    if whole[: len(context)] == context and len(whole) > len(context):
        return context, whole[len(context) :]
    return context, tokenizer.encode(continuation)


@torch.no_grad()
def score_probes(model, tokenizer, probes: list[Probe], batch_size: int = 32) -> list[ProbeResult]:
    """Summed log-probability of both continuations of every probe under head 0 (next token)."""
    max_len = model.config.max_seq_len
    sequences, spans = [], []
    for probe in probes:
        for continuation in (probe.correct, probe.distractor):
            context, cont = encode_pair(tokenizer, probe.prefix, continuation)
            if not context:
                context = [tokenizer.eos_id]  # the first token needs something to be predicted from
            ids = context + cont
            if len(ids) > max_len:
                raise UserError(
                    f"probe {probe.where} is {len(ids)} tokens long, "
                    f"more than the model's context of {max_len}"
                )
            sequences.append(ids)
            spans.append((len(context), len(ids)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logps = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        tokens_BT = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, ids in enumerate(chunk):
            tokens_BT[row, : len(ids)] = torch.tensor(ids)  # right padding: causal attention ignores it
        logp_BTV = F.log_softmax(model(tokens_BT.to(device))[:, :, 0].float(), dim=-1).cpu()
        for row, (first, end) in enumerate(spans[start : start + batch_size]):
            positions = torch.arange(first - 1, end - 1)
            logps.append(logp_BTV[row, positions, tokens_BT[row, first:end]].sum().item())
    return [ProbeResult(probe, logps[2 * i], logps[2 * i + 1]) for i, probe in enumerate(probes)]


def family_accuracy(results: list[ProbeResult]) -> dict[str, tuple[float, int]]:
    """(accuracy, number of pairs) per family, in first-seen order."""
    right: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        right[result.probe.family].append(result.right)
    return {family: (sum(r) / len(r), len(r)) for family, r in right.items()}
