"""Datasets, prompts and math-verify grading shared by the demo, benchmarks and `memshare eval`."""
