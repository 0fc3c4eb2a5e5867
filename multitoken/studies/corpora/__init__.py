"""Synthetic corpora and probe sets of the studies: stories with names, polynomials, ICL tasks, probes."""
