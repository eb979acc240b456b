"""Tests of the ctxtrace subcommands: run, check-imports, report, demo."""
