"""lab icl: prompts and flips, the pretraining mixture, mock models through the harness, scorer parity,
the command end to end (trained and --checkpoint) and its one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from multitoken.cli import main
from multitoken.model import MultiTokenLM
from multitoken.studies.corpora.icl_tasks import (
    ARROW,
    CONDITIONS,
    FLIP_FRACTIONS,
    SUL,
    SUL_LABELS,
    ZERO_SHOT,
    Mixture,
    base_prompts,
    build_conditions,
    builtin_tasks,
    evaluate,
    flip_condition,
    flipped_prompt,
    flips_per_class,
    pretraining_documents,
    split_items,
    sul_prompt,
)
from multitoken.studies.lab.icl import ModelScorer, answer_text
from multitoken.tokenizer import byte_tokenizer

from conftest import tiny_config

TASKS = builtin_tasks()
ITEM_CLASS = {item: cls for task in TASKS for cls, items in enumerate(task.items) for item in items}
TRUE_LABEL = {
    item: task.labels[cls] for task in TASKS for cls, items in enumerate(task.items) for item in items
}
MISSING = -100.0
"""Log-probability a mock gives a label it has no reason for."""


def parse(prompt: str) -> tuple[list[tuple[str, str]], str]:
    """(item, label) of each exemplar line and the query item of a prompt."""
    *lines, query = prompt.split("\n")
    assert query.endswith(ARROW)
    return [tuple(line.split(ARROW + " ")) for line in lines], query.removesuffix(ARROW)


class InContextFollower:
    """Knows each item's class; scores a label by the share of the query's class exemplars carrying it."""

    def label_logprobs(self, prompts, candidates):
        scores = []
        for prompt, cands in zip(prompts, candidates, strict=True):
            exemplars, query = parse(prompt)
            same = [label for item, label in exemplars if ITEM_CLASS[item] == ITEM_CLASS[query]]
            counts = [same.count(c.strip()) for c in cands]
            scores.append([math.log(n / len(same)) if n else MISSING for n in counts])
        return scores


class PriorOnly:
    """Ignores the exemplars: the true label of the query item, whatever the context says."""

    def label_logprobs(self, prompts, candidates):
        return [
            [0.0 if c.strip() == TRUE_LABEL[parse(p)[1]] else MISSING for c in cands]
            for p, cands in zip(prompts, candidates, strict=True)
        ]


# ---- tasks, prompts, mixture -------------------------------------------------------------------------


def test_builtin_tasks_have_disjoint_balanced_items():
    assert [t.name for t in TASKS] == ["sentiment", "category", "parity", "case"]
    assert len(ITEM_CLASS) == sum(len(items) for t in TASKS for items in t.items)  # no item in two places
    for task in TASKS:
        assert len(task.items[0]) == len(task.items[1]) >= 32
    assert TRUE_LABEL["417"] == "odd" and TRUE_LABEL["happy"] == "positive" and TRUE_LABEL["bread"] == "food"


def test_rule_tasks_hold_out_query_items():
    split = split_items(TASKS, seed=3, held_out=0.2)
    for task in TASKS:
        for cls in (0, 1):
            seen, queries = set(split.seen[task.name][cls]), set(split.queries[task.name][cls])
            if task.rule:
                assert not seen & queries and len(queries) == round(0.2 * len(task.items[cls]))
            else:
                assert queries == seen == set(task.items[cls])


@pytest.mark.parametrize("shots", [3, 4])
def test_flips_are_balanced_nested_and_never_touch_the_query(shots):
    split = split_items(TASKS, seed=0, held_out=0.2)
    for task in TASKS:
        for base in base_prompts(task, split, shots, 6, seed=0):
            previous: set[int] = set()
            for fraction in FLIP_FRACTIONS:
                prompt = flipped_prompt(base, fraction)
                exemplars, query = parse(prompt.text)
                assert query == base.query[0] and query not in {item for item, _ in exemplars}
                assert prompt.candidates[prompt.answer] == " " + TRUE_LABEL[query]
                flipped = {j for j, (item, label) in enumerate(exemplars) if label != TRUE_LABEL[item]}
                for cls in (0, 1):
                    in_class = [j for j, (item, _) in enumerate(exemplars) if ITEM_CLASS[item] == cls]
                    assert len(in_class) == shots
                    assert len(flipped & set(in_class)) == flips_per_class(fraction, shots)
                assert previous <= flipped  # the 25% flips are among the 50% flips, and so on
                previous = flipped
            sul = sul_prompt(base)
            exemplars, _ = parse(sul.text)
            mapping = {ITEM_CLASS[item]: label for item, label in exemplars}
            assert len(mapping) == 2 and set(mapping.values()) == set(SUL_LABELS)
            assert sul.candidates[sul.answer] == " " + mapping[base.query[1]]


def test_flips_per_class_rounds_halves_up():
    assert [flips_per_class(f, 4) for f in FLIP_FRACTIONS] == [0, 1, 2, 3, 4]
    assert [flips_per_class(f, 2) for f in FLIP_FRACTIONS] == [0, 1, 1, 2, 2]


def test_pretraining_documents_are_consistent_and_leave_held_out_items_out():
    split = split_items(TASKS, seed=0, held_out=0.2)
    held_out = {item for name, pair in split.queries.items() for items in pair for item in items}
    held_out -= {item for pair in split.seen.values() for items in pair for item in items}
    mixture = Mixture(prior_share=0.5, own_label_share=0.2, lines=(4, 12), repeat_share=0.3)
    documents = pretraining_documents(TASKS, split, mixture, 2000, seed=0)
    prior = own_reversed = repeats = n_lines = 0
    for document in documents:
        lines = [tuple(line.split(ARROW + " ")) for line in document.splitlines()]
        assert 4 <= len(lines) <= 12
        n_lines += len(lines)
        repeats += sum(item in {i for i, _ in lines[:k]} for k, (item, _) in enumerate(lines))
        mapping: dict[int, str] = {}
        for item, label in lines:
            assert item not in held_out and label not in SUL_LABELS
            assert mapping.setdefault(ITEM_CLASS[item], label) == label  # one label per class
        true = {ITEM_CLASS[item]: TRUE_LABEL[item] for item, _ in lines}
        prior += mapping == true
        own_reversed += set(mapping.values()) == set(true.values()) and mapping != true and len(true) == 2
    assert 0.45 < prior / len(documents) < 0.6  # 50% prior documents (+ own-label ones that came out true)
    assert 0.01 < own_reversed / len(documents) < 0.1  # about 0.5 * 0.2 * 0.5 = 5% state the reversed mapping
    # 30% of the lines after the first repeat an earlier item on purpose, a few more by chance
    assert 0.25 < repeats / (n_lines - len(documents)) < 0.4


# ---- the harness on mock models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditions():
    return build_conditions(shots=4, n_prompts=10, seed=0, held_out=0.2)


def test_follower_copies_the_context(conditions):
    results = evaluate(InContextFollower(), conditions)
    accuracy = [results[flip_condition(f)]["accuracy"] for f in FLIP_FRACTIONS]
    assert accuracy == [1.0, 1.0, 0.5, 0.0, 0.0]  # majority of 4 same-class exemplars; a 2-2 tie is half
    for fraction in FLIP_FRACTIONS:
        prob = results[flip_condition(fraction)]["answer_probability"]
        assert prob == pytest.approx(1 - fraction, abs=1e-9)  # share of same-class exemplars kept true
    assert results[SUL]["accuracy"] == 1.0
    assert results[ZERO_SHOT]["accuracy"] == 0.5  # no exemplars: no reason for either label
    assert all(r["prompts"] == 40 for r in results.values())
    assert set(results[SUL]["per_task"]) == {t.name for t in TASKS}


def test_prior_only_stays_flat(conditions):
    results = evaluate(PriorOnly(), conditions)
    for fraction in FLIP_FRACTIONS:
        assert results[flip_condition(fraction)]["accuracy"] == 1.0
        assert results[flip_condition(fraction)]["answer_probability"] == pytest.approx(1.0)
    assert results[ZERO_SHOT]["accuracy"] == 1.0
    assert results[SUL]["accuracy"] == 0.5 and results[SUL]["answer_probability"] == 0.5  # foo/bar: no prior


# ---- the real scorer ---------------------------------------------------------------------------------


def byte_model(**overrides) -> MultiTokenLM:
    torch.manual_seed(0)
    return MultiTokenLM(tiny_config(vocab_size=258, dim=32, n_layers=3, n_heads=2, n_kv_heads=2,
                                    max_seq_len=160, **overrides)).eval()  # fmt: skip


@pytest.mark.parametrize("style", ["transformer", "sequential"])
def test_model_scorer_matches_the_logits(style):
    model = byte_model(n_future=2, head_style=style)
    tokenizer = byte_tokenizer()
    prompts = ["happy -> positive\nsad ->", "417 ->", "QWRT -> upper\nqwrt -> lower\nBBCD ->"]
    candidates = [[" positive", " negative"], [" even", " odd"], [" upper", " lower", " x"]]
    scores = ModelScorer(model, tokenizer, batch_size=3).label_logprobs(prompts, candidates)
    for prompt, cands, row in zip(prompts, candidates, scores, strict=True):
        for cand, score in zip(cands, row, strict=True):
            context = [tokenizer.eos_id, *tokenizer.encode(prompt)]
            ids = torch.tensor([[*context, *tokenizer.encode(cand)]])
            with torch.no_grad():
                logp_TV = F.log_softmax(model(ids)[0, :, 0].float(), dim=-1)
            expected = sum(float(logp_TV[t - 1, ids[0, t]]) for t in range(len(context), ids.shape[1]))
            assert score == pytest.approx(expected, abs=1e-4)


def test_model_scorer_refuses_what_it_cannot_score():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="no tokenizer"):
        ModelScorer(byte_model(), None)
    with pytest.raises(ValueError, match="next-token head"):
        ModelScorer(byte_model(n_future=2, head_offsets=[2, 4]), tokenizer)
    scorer = ModelScorer(byte_model(), tokenizer)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        scorer.label_logprobs(["x ->"], [[" a", ""]])
    with pytest.raises(ValueError, match="max_seq_len is 160; pass a smaller --shots"):
        scorer.label_logprobs(["x -> a\n" * 40], [[" a", " b"]])


# ---- end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl") / "report"
    assert main(["lab", "icl", "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_debug_run_writes_report(debug_run):
    lines = (debug_run / "report.md").read_text().splitlines()
    assert lines[2].startswith("**Question.**") and lines[4].startswith("**Answer (this run).**")
    for name in ("flipped_labels.png", "unrelated_labels.png", "by_task.png"):
        assert (debug_run / name).stat().st_size > 1000
    payload = json.loads((debug_run / "results.json").read_text())
    results = payload["results"]
    assert set(results["models"]) == {f"{size} n={n}" for size in ("dim32", "dim48") for n in (1, 2)}
    assert results["shots"] == 2 and results["prompts_per_condition"] == 16
    for model in results["models"].values():
        assert set(model["conditions"]) == set(CONDITIONS)
        for scores in model["conditions"].values():
            assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["answer_probability"] <= 1
            assert all(0 <= a <= 1 for a in scores["per_task"].values())
        assert model["val_loss"] > 0
    assert payload["command"].startswith("multitoken lab icl") and "--scale debug" in payload["command"]


def test_checkpoint_runs_the_same_protocol(debug_run, tmp_path, capsys):
    out = tmp_path / "ckpt"
    run = debug_run / "runs" / "dim48-n2"
    assert main(["lab", "icl", "--scale", "debug", "--out", str(out), "--checkpoint", str(run)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results["models"]) == ["checkpoint n=2"]
    trained = json.loads((debug_run / "results.json").read_text())["results"]["models"]["dim48 n=2"]
    # the same prompts on the same model
    assert results["models"]["checkpoint n=2"]["conditions"] == trained["conditions"]
    assert not (out / "runs").exists()
    capsys.readouterr()

    # a prompt longer than the model's context, and a checkpoint without its tokenizer: one line, exit 2
    argv = ["lab", "icl", "--scale", "debug", "--out", str(tmp_path / "bad"), "--checkpoint", str(run)]
    assert main([*argv, "--shots", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_seq_len" in err
    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints" / "step_000004", bare)
    (bare / "tokenizer.json").unlink()
    argv = ["lab", "icl", "--scale", "debug", "--out", str(tmp_path / "bad2"), "--checkpoint", str(bare)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err


def test_bad_shots_exit_2(tmp_path, capsys):
    assert main(["lab", "icl", "--scale", "debug", "--out", str(tmp_path), "--shots", "0"]) == 2
    assert "--shots" in capsys.readouterr().err


def test_answer_reads_the_mock_models_right(conditions):
    def model(size, scorer):
        return {"size": size, "n_future": 1, "conditions": evaluate(scorer, conditions)}

    results = {
        "shots": 4,
        "prompts_per_condition": 40,
        "models": {
            "dim32 n=1": model("dim32", PriorOnly()),
            "dim64 n=1": model("dim64", InContextFollower()),
        },
    }
    text = answer_text(results, ["dim32", "dim64"])
    assert "dim32 n=1 100% -> 100% (keeps its prior: flat within noise)" in text
    assert "dim64 n=1 100% -> 0% (follows the flipped labels, below chance)" in text
    assert (
        "above chance: dim64 n=1" in text and "dim64 n=1 drops more than dim32 n=1 (100 vs 0 points)" in text
    )
    assert "By heads" not in text  # no n > 1 model to compare
