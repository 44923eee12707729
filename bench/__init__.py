"""Reproducible benchmarks: each prints a table and writes JSON under bench/results/ (`python -m bench.<name>`)."""
