"""Evaluation helpers: benchmark runners, metrics, FLOPs accounting and latency measurement."""
