"""The scripts behind benchmarks/BENCHMARKS.md. Run one from the repository root as a module,
`python -m benchmarks.NAME --help`, so that the scripts can import each other."""
