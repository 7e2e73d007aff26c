"""libpq's own parser for connection strings, behind a driver-free error, so config
validation can check a DSN exactly as the driver will read it without importing it."""

from __future__ import annotations

__all__ = ["ConninfoError", "parse_conninfo"]


class ConninfoError(ValueError):
    """libpq refused a connection string; the message is libpq's (it may quote the string)."""


def parse_conninfo(text: str) -> dict[str, str]:
    """The parameters of a URL or key=value connection string, as libpq parses them."""
    # imported here: loading a config must not pay for the driver until a DSN is checked
    from psycopg import Error as DriverError
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except DriverError as exc:
        raise ConninfoError(str(exc)) from None
