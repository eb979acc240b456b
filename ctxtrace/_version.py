"""The installed ctxtrace version, for instrumentation scopes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION: str = version("ctxtrace")
except PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0.0.0"
