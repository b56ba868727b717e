"""Real PostgreSQL for the tests (ledger/pgcluster.py), registered by conftest.py.

`pg_cluster`: one throwaway cluster (a primary, no standby) for the whole session,
removed at the end. `pg_dsn`: a new, empty database on it for one test. Tests that stop,
kill or promote servers make their own cluster (one per module), never this one.
Without the PostgreSQL 15 server binaries the tests that need them are skipped, saying
so; scripts/test installs them first, so on CI they run.
"""

from __future__ import annotations

import itertools
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


def new_cluster() -> PgCluster:
    reason = pg_missing()
    if reason is not None:
        pytest.skip(reason)
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
