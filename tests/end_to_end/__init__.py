"""End-to-end tests: real servers and workers, load, soak and the benchmark smoke."""
