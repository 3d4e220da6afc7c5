"""Experiments and benchmarks: spec -> runs -> records (JSON with spec, seed, git SHA, versions) -> plots."""
