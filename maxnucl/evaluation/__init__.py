"""Evaluation benchmarks (GSM8K, MBPP, SuperGLUE, perplexity), their metrics and sandboxed code execution."""
