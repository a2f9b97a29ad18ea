"""Benchmarks: `make bench` runs every group, `make bench ONLY=data` one. Each figure is printed as
`name: value` on its own line and written to data/bench/<group>.json. Ratios compare against a baseline
measured in the same run on the same data, never against a number from elsewhere."""
