"""Evaluation: sandboxed code execution, pass@k, and code benchmarks (HumanEval, MBPP)."""
