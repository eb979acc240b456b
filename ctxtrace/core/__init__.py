"""The core: knows Flask and nothing else (hooks, ledger, sites)."""
