"""One Alembic history on both databases: up, down, up again, and no drift between models and migrations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, select

from bastion.db import migrate
from bastion.db.models import Base, Tenant
from bastion.db.session import create_engine, session_factory

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_up_down_up_and_no_drift(database_url: str) -> None:
    expected = set(Base.metadata.tables)
    migrate.upgrade(database_url)
    assert expected <= asyncio.run(_tables(database_url))
    migrate.check(database_url)  # raises when autogenerate would produce a new migration

    migrate.downgrade(database_url, "base")
    assert not expected & asyncio.run(_tables(database_url))
    assert migrate.current(database_url) == "(empty database)"

    migrate.upgrade(database_url)
    assert expected <= asyncio.run(_tables(database_url))
    assert "(head)" in migrate.current(database_url)
    migrate.check(database_url)


async def _roundtrip_time(url: str) -> datetime:
    engine = create_engine(url)
    try:
        sessions = session_factory(engine)
        local = datetime(2026, 11, 29, 15, 0, tzinfo=timezone(timedelta(hours=2)))
        async with sessions() as session:
            session.add(Tenant(name="acme-time", created_at=local))
            await session.commit()
        async with sessions() as session:
            return (await session.execute(select(Tenant.created_at).where(Tenant.name == "acme-time"))).scalar_one()
    finally:
        await engine.dispose()


def test_timestamps_come_back_in_utc(database_url: str) -> None:
    migrate.upgrade(database_url)
    value = asyncio.run(_roundtrip_time(database_url))
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert value == datetime(2026, 11, 29, 13, 0, tzinfo=UTC)
