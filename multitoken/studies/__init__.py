"""The studies: small, checkable experiments on multi-token models, each writing a report directory.

paper/ reproduces the paper's experiments (Gloeckle et al. 2024: induction, polynomial arithmetic, bytes,
the n sweep); lab/ studies how language models learn (kinds of tokens, surprisal, induction heads, a
scratchpad, in-context learning, emergence, choice points, the horizon); scaling/ fits and predicts
scaling laws; corpora/ generates their synthetic data. runs.py, scoring.py, measure.py and report.py
hold what they share: budgets and training, per-token scores, timing and memory, and the report.
"""
