"""The emitters: logs, metrics and spans, and the providers behind them."""
