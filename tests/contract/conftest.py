"""Contract suites: one set of tests per port, run against every implementation.

The real-server implementations use the local stack through the integration
tests' ``stack`` fixture, which FAILS (never skips) when the stack is not up.
"""

from __future__ import annotations

from tests.integration.conftest import stack  # noqa: F401 - re-exported as a fixture
