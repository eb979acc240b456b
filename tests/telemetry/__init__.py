"""Tests of the emitters: logs, metrics, spans and the exporters behind them."""
