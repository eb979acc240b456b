"""Tests of the core: hooks, ledger and what they detect, against real Flask."""
