"""Speed benchmarks (issue 11): training step, prediction and data throughput; see docs/benchmarks.md.

`python -m experiments.benchmark --mode train|predict|data [options]`; one module per job: `models` (the tiny
and SD2-size architectures), `timing` (clocks and statistics), `train`, `reference` (the reference-style baseline),
`memory` (peak memory per configuration), `predict`, `data`, `report` (machine, tables, JSON, plots).
"""
