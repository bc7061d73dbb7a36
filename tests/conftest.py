"""Fixtures shared by the test modules: the stores of every backend.

`any_store` runs a test on SQLite and on a real PostgreSQL server (a
throwaway cluster started once per session, tests/pg.py), each on a fresh
database: the store's contract is the same on every backend (issue 11).
Outside CI a machine without PostgreSQL skips the PostgreSQL half; in CI
(`CI` set) it fails, so that CI never silently tests one backend.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailbridge.config import StoreConfig
from mailbridge.store.sqlstore import SqlStore
from tests.fake_cm import FakeCm
from tests.httpfake import ProviderServer
from tests.pg import PgCluster, pg_bin
from tests.smsc_peer import smsc  # noqa: F401  (the SMSC peer, for every SMPP test)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/test.sh installs it)")
        pytest.skip("PostgreSQL is not installed (scripts/test.sh installs it)")
    cluster = PgCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def cm() -> Iterator[tuple[FakeCm, ProviderServer]]:
    """CM's JSON gateway (tests/fake_cm.py) on a real HTTP server, per test."""
    fake = FakeCm()
    with ProviderServer(fake) as server:
        yield fake, server
    fake.release()


def postgres_config(cluster: PgCluster, **kw: object) -> StoreConfig:
    """A store config on a fresh database of the cluster."""
    return StoreConfig.model_validate({"postgresql": cluster.new_database(), **kw})


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """An open store of each backend (the test runs once per backend)."""
    store: SqlStore
    if request.param == "sqlite":
        from mailbridge.store.sqlite import SqliteStore

        store = SqliteStore(tmp_path / "db.sqlite")
    else:
        from mailbridge.store.postgres import PostgresStore

        cluster = request.getfixturevalue("pg_cluster")
        store = PostgresStore(postgres_config(cluster))
    await store.open()
    yield store
    await store.close()
