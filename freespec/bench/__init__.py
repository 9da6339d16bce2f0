"""The Spec-Bench-style benchmark: run, methods, report."""
