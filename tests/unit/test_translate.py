"""The one table from PostgreSQL errors to reconciler errors."""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors

from reconciler.errors import ClockSkewError, StoreError, StoreUnavailable
from reconciler.store.translate import translate


def test_lock_table_exhaustion_says_what_to_change() -> None:
    error = translate(pg_errors.lookup("53200")("out of shared memory"), region="eu-west", step="apply batch")
    assert type(error) is StoreError
    assert error.retryable  # another big transaction ending frees the table
    assert "53200" in str(error) and "batch.apply" in str(error) and "max_locks_per_transaction" in str(error)
    assert error.context["region"] == "eu-west"


def test_classes_map_to_types_and_retryability() -> None:
    deadlock = translate(pg_errors.lookup("40P01")("deadlock detected"))
    assert deadlock.retryable and "40P01" in str(deadlock)
    missing = translate(pg_errors.lookup("42P01")("relation does not exist"))
    assert not missing.retryable
    skew = translate(pg_errors.lookup("P0001")("plain raise"))
    assert not isinstance(skew, ClockSkewError) and not skew.retryable


def test_unreachable_server_is_retryable_and_the_dsn_keeps_no_password() -> None:
    error = translate(psycopg.OperationalError("connection refused"),
                      dsn="postgresql://app:s3cret@127.0.0.1:1/db")
    assert isinstance(error, StoreUnavailable) and error.retryable
    assert "s3cret" not in str(error.to_dict())
