"""A generator of children's-story-style text whose characters recur, for the induction experiment.

Stories are built from many sentence patterns over lists of objects, places, verbs, feelings and
animals; each has two or three characters who are named again and again. Characters get ordinary
placeholder names from NAMES; `induction.py` replaces them with random two-token names.
"""

from __future__ import annotations

import random

NAMES = (
    "Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Lucy", "Jack", "Emma", "Leo", "Zoe", "Tim", "Sara",
    "Finn", "Ella", "Jake", "Rosie", "Noah", "Ivy",
)  # fmt: skip
"""Placeholder character names (also the default name list of the generated corpus)."""

OBJECTS = (
    "ball", "kite", "box", "hat", "cake", "book", "drum", "boat", "cup", "shell", "key", "lamp", "bell",
    "toy car", "red bucket", "blue scarf", "little spoon", "shiny stone", "paper crown", "wooden horse",
    "big apple", "soft blanket", "yellow flower", "old map", "small bag", "green leaf", "silver coin",
)  # fmt: skip
PLACES = (
    "the park", "the garden", "the beach", "the forest", "the kitchen", "the school", "the farm",
    "the river", "the hill", "the town", "the zoo", "the market", "the lake", "the field", "the library",
    "the playground", "the barn", "the cave", "the meadow", "the shop",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "bird", "frog", "rabbit", "duck", "fox", "bear", "mouse", "horse", "owl", "fish", "bee",
    "puppy", "kitten", "turtle", "squirrel", "goat", "lamb", "pig",
)  # fmt: skip
FEELINGS = ("happy", "sad", "excited", "scared", "tired", "proud", "angry", "surprised", "calm", "curious")
ADJECTIVES = ("big", "small", "kind", "funny", "brave", "quiet", "silly", "clever", "gentle", "shy")
VERBS = (
    "played", "danced", "ran", "jumped", "sang", "laughed", "walked", "looked around", "smiled",
    "sat down", "waited", "hid", "clapped", "rested", "shouted",
)  # fmt: skip
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "snowy", "bright", "cloudy")
TIMES = ("One day", "One morning", "Once upon a time", "Long ago", "One sunny afternoon", "Last summer")

OPENINGS = (
    "{time}, {a} and {b} went to {place}.",
    "{time}, there was a {adj} child named {a}.",
    "{time}, {a} met {b} near {place}.",
    "{a} lived near {place} with a {animal}.",
    "{time}, {a} woke up and felt {feel}.",
)
MIDDLES = (
    "{a} found a {obj} under a tree.",
    '{a} said, "Look, {b}! I see a {animal}!"',
    "{b} wanted to play with the {obj}, but {a} said no.",
    "{a} and {b} {verb} together.",
    "The {animal} ran to {a} and {verb}.",
    "{a} gave the {obj} to {b}.",
    "{b} was {feel} because the {obj} was lost.",
    "It was a {weather} day, so {a} took the {obj}.",
    '{a} asked {b}, "Can you help me find my {obj}?"',
    '{b} nodded and said, "Yes, {a}, I will help you."',
    "They looked in {place}, but the {obj} was not there.",
    "Then {c} came and {verb}.",
    "{c} had a {adj} {animal} named Pip.",
    "{a} told {c} about the {obj}.",
    "{b} laughed and gave {a} a hug.",
    "{a} was {feel}, and {b} was {feel2}.",
    '"Thank you, {b}," said {a}.',
    "{c} showed {a} and {b} the way to {place}.",
    "{b} climbed up high and saw the {obj}.",
    "{a} shared the {obj} with {b} and {c}.",
    "The {adj} {animal} followed {b} all the way to {place}.",
    "{a} and {c} built a house for the {animal}.",
    "{b} sang a song about a {adj} {animal}.",
    "When it started to rain, {a} and {b} ran home.",
    '{c} said, "{a}, you are very {adj}!"',
)
ENDINGS = (
    "In the end, {a} and {b} were best friends.",
    "{a} smiled, and {b} smiled too.",
    "That night, {a} dreamed about the {obj}.",
    '{b} said, "Let\'s play again tomorrow, {a}."',
    "From that day on, {a} always shared with {b}.",
    "{a}, {b} and {c} went home {feel}.",
)


def story(rng: random.Random, names: tuple[str, ...] = NAMES, n_middle: tuple[int, int] = (5, 10)) -> str:
    """One story: an opening, 5-10 middle sentences and an ending, about three distinct characters."""
    a, b, c = rng.sample(names, 3)

    def fill(pattern: str) -> str:
        feel, feel2 = rng.sample(FEELINGS, 2)
        return pattern.format(
            a=a, b=b, c=c, time=rng.choice(TIMES), place=rng.choice(PLACES), animal=rng.choice(ANIMALS),
            obj=rng.choice(OBJECTS), adj=rng.choice(ADJECTIVES), verb=rng.choice(VERBS), feel=feel,
            feel2=feel2, weather=rng.choice(WEATHER),
        )  # fmt: skip

    middle = [fill(rng.choice(MIDDLES)) for _ in range(rng.randint(*n_middle))]
    return " ".join([fill(rng.choice(OPENINGS)), *middle, fill(rng.choice(ENDINGS))])


def stories(seed: int, n: int) -> list[str]:
    """`n` stories from a seeded generator."""
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]
