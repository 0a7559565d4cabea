"""pytest-alembic's built-in checks on the example blog migrations, each on a fresh database.

single head, upgrade base→head, up/down consistency (every downgrade runs, one step at a time)
and the models matching the DDL the migrations produce.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import sqlalchemy
from pytest_alembic import Config
from pytest_alembic.tests import (  # noqa: F401  (collected as tests here)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

from tests.conftest import ADMIN_URL, ROOT, create_database, drop_database


@pytest.fixture
def alembic_config() -> Config:
    return Config(config_options={"file": str(ROOT / "alembic.ini")})


@pytest.fixture
def alembic_engine() -> Iterator[sqlalchemy.Engine]:
    database = create_database(ADMIN_URL, prefix="pa")
    engine = sqlalchemy.create_engine(database.url.replace("postgresql://", "postgresql+psycopg2://"))
    yield engine
    engine.dispose()
    drop_database(database)


def test_downgrade_0006_splits_full_name_back(alembic_runner, alembic_engine) -> None:
    """The data migration's downgrade restores first and last name from full_name."""
    alembic_runner.migrate_up_to("0006")
    with alembic_engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (email, full_name) VALUES ('a@x', 'Ada King Lovelace'), ('b@x', 'Plato')"
        )

    alembic_runner.migrate_down_one()

    with alembic_engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT first_name, last_name FROM users ORDER BY email").all()
    assert [("Ada", "King Lovelace"), ("Plato", "")] == [tuple(r) for r in rows]
