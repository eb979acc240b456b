"""The ``ctxtrace`` subcommands; only ``ctxtrace.cli`` imports them."""
