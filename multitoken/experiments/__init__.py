"""The paper's experiments (Gloeckle et al. 2024): induction, polynomial arithmetic, bytes, the n sweep.

Each trains next-token and multi-token models side by side (same seed, data and budget) through
`runner.train_variant` and writes a report directory with `multitoken.report.Report`.
"""
