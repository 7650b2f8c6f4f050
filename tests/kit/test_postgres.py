"""The PostgreSQL mode: `BACKSTOP_TEST_DATABASE_URL` names a server, and each test gets a
database of its own there, dropped after it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.testing import DATABASE_ENV
from tests.kit.conftest import RunKit


def databases(server: str) -> set[str]:
    """The names of the databases on the server."""
    engine = sa.create_engine(server)
    try:
        with engine.connect() as conn:
            return set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())
    finally:
        engine.dispose()


def test_each_test_gets_its_own_postgresql_database_dropped_after_it(
    pytester: pytest.Pytester, run_kit: RunKit, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    monkeypatch.setenv(DATABASE_ENV, server)
    pytester.makepyfile(
        test_postgres="""
        from datetime import timedelta
        from pathlib import Path

        import sqlalchemy as sa
        from tenacity import wait_fixed

        from app import TaskContext, task
        from store import migrate
        from store.engine import Database

        NAMES = Path("databases.txt")


        def record(url):
            with NAMES.open("a") as out:
                out.write(sa.make_url(url).database + "\\n")


        @task(name="pg.flaky", wait=wait_fixed(60))
        def flaky(ctx: TaskContext) -> int:
            if ctx.attempt == 1:
                raise ConnectionError("upstream down")
            return ctx.attempt


        def test_the_database_is_postgresql_and_migrated(backstop_database_url, backstop_settings):
            url = sa.make_url(backstop_database_url)
            assert url.get_backend_name() == "postgresql"
            assert url.database.startswith("backstop_test_")
            assert backstop_settings.url == backstop_database_url
            db = Database.from_url(backstop_database_url)
            try:
                assert migrate.is_current(db)
            finally:
                db.dispose()
            record(backstop_database_url)


        def test_the_whole_kit_works_on_it(
            backstop_database_url, backstop_client, backstop_drain, backstop_tasks
        ):
            record(backstop_database_url)
            key = {"Idempotency-Key": "pg-1"}
            response = backstop_client.post("/tasks", json={"name": "pg.flaky"}, headers=key)
            assert response.status_code == 202
            again = backstop_client.post("/tasks", json={"name": "pg.flaky"}, headers=key)
            assert (again.status_code, again.json()["id"]) == (200, response.json()["id"])
            backstop_tasks.assert_enqueued("pg.flaky")

            [first] = backstop_drain()
            [second] = backstop_drain(advance=timedelta(minutes=2))

            assert (first.status, second.status, second.result) == ("retrying", "succeeded", 2)
            assert backstop_client.get(f"/tasks/{second.id}").json()["attempts"] == 2


        def test_a_failing_test_still_drops_its_database(backstop_database_url, backstop_app):
            record(backstop_database_url)
            assert False, "on purpose"
        """
    )

    result = run_kit()

    result.assert_outcomes(passed=2, failed=1)
    names = (pytester.path / "databases.txt").read_text().split()
    assert len(set(names)) == 3
    assert databases(server).isdisjoint(names)


def test_a_variable_that_names_another_database_is_refused(
    pytester: pytest.Pytester, run_kit: RunKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATABASE_ENV, "sqlite:///somewhere.db")
    pytester.makepyfile(
        test_sqlite="""
        def test_needs_a_database(backstop_settings):
            pass
        """
    )

    result = run_kit()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*{DATABASE_ENV} must name a PostgreSQL server, not 'sqlite:///somewhere.db'*"]
    )
