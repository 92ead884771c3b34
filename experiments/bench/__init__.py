"""Speed, memory and bound-tightness benchmarks: each prints its figures and ratios
(``python -m experiments.bench.<name>``); none of them runs in the test suite's timings."""
