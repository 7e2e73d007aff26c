"""Fixtures shared by the contract suites: each port's one suite runs against the
real servers of the local stack and against its in-memory implementation.

The real side uses the integration tests' stack fixture, so a missing or dead
stack fails these tests as it fails those (never a skip that tested nothing).
"""

from __future__ import annotations

from tests.integration.conftest import config_path, stack

__all__ = ["config_path", "stack"]
