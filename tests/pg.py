"""Real PostgreSQL for the tests (ledger/pgcluster.py), registered by conftest.py.

`pg_cluster`: one throwaway cluster (a primary, no standby) for the whole session,
removed at the end. `pg_dsn`: a new, empty database on it for one test. Tests that stop,
kill or promote servers make their own cluster (one per module), never this one.
Without the PostgreSQL 15 server binaries the tests that need them FAIL, saying how to
install them (scripts/test installs them first, so on CI they run); set
JACKPAY_ALLOW_NO_PG=1 to skip them instead on a machine where that cannot be done.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from ledger.pgcluster import ClusterError, PgCluster, find_bindir

_databases = itertools.count(1)


def pg_missing() -> str | None:
    """Why no throwaway cluster can be made here (None: it can)."""
    try:
        find_bindir()
    except ClusterError as exc:
        return str(exc)
    return None


def require_pg() -> None:
    """Fail (or, with JACKPAY_ALLOW_NO_PG=1, skip) the test when there is no PostgreSQL:
    a run that quietly skips the store's tests must not pass for one that ran them."""
    reason = pg_missing()
    if reason is None:
        return
    if os.environ.get("JACKPAY_ALLOW_NO_PG") == "1":
        pytest.skip(f"no PostgreSQL (JACKPAY_ALLOW_NO_PG=1): {reason}")
    pytest.fail(f"{reason}; scripts/test installs postgresql-15 when run as root (or with "
                "sudo); set JACKPAY_ALLOW_NO_PG=1 to skip these tests instead")


def new_cluster() -> PgCluster:
    require_pg()
    return PgCluster.create()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = new_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    name = f"test_{next(_databases)}"
    pg_cluster.primary.sql(f"CREATE DATABASE {name}")
    return pg_cluster.dsn(name)
