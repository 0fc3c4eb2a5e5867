"""The induction corpus: names are exactly two tokens, and the metric picks their repeated second tokens."""

import random

from multitoken.studies.corpora import stories
from multitoken.studies.paper import induction


def _tokenizer():
    return induction.name_tokenizer(stories.stories(0, 200), 400)


def test_every_pool_name_is_two_tokens_even_in_context():
    tok = _tokenizer()
    pool = induction.two_token_names(tok, set())
    assert len(pool) > 0.9 * len(induction.syllables()[0]) ** 2
    rng = random.Random(0)
    for name in rng.sample(sorted(pool), 100):
        a, b = pool[name]
        for context in (f"Then {name} ran.", f'"Yes, {name}," said Mia.', f"So {name}'s hat and {name}."):
            ids = tok.encode(context)
            count = sum(1 for t in range(1, len(ids)) if (ids[t - 1], ids[t]) == (a, b))
            assert count == context.count(name), (name, context)
        assert tok.decode([a, b]) == " " + name


def test_replace_names_is_consistent_within_a_story():
    text = "Lily met Tom. Tom said hi to Lily. Tomato is not Tom."
    out, used = induction.replace_names(text, ["Lily", "Tom"], ["Kalo", "Mibe", "Sude"], random.Random(0))
    assert len(used) == 2 and "Tomato" in out and "Lily" not in out
    first, second = used
    assert out == f"{first} met {second}. {second} said hi to {first}. Tomato is not {second}."


def test_metric_positions_on_a_hand_made_example():
    # ids:     0   1  2  3  4  5  6  7  8  9  10 11
    ids = [99, 10, 20, 5, 30, 40, 6, 10, 20, 30, 40, 10]
    repeated, first = induction.repeated_name_positions(ids, {(10, 20), (30, 40)})
    assert first == [2, 5]  # first mentions of both names
    assert repeated == [8, 10]  # second tokens of the repeated mentions
    # A name's first token alone, or tokens of a name not in the story, are never counted.
    assert induction.repeated_name_positions([10, 5, 10, 20], {(10, 20)}) == ([], [3])


def test_metric_on_real_text():
    tok = _tokenizer()
    pool = induction.two_token_names(tok, set())
    a, b = sorted(pool)[:2]
    ids = tok.encode(f"Once {a} met {b}. {b} smiled at {a}, and {a} laughed.")
    repeated, first = induction.repeated_name_positions(ids, {pool[a], pool[b]})
    assert len(first) == 2 and len(repeated) == 3
    assert all(ids[t] in (pool[a][1], pool[b][1]) for t in repeated)
