"""Scaling laws: fit L(N, D), L(N) and L(C) to points, or train a grid and predict its largest run."""
