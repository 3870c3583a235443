"""Alembic's environment, run programmatically only: the store (database.py) or
`python -m server.store` hands over an open connection in `config.attributes`, inside
SQLAlchemy's async engine via `connection.run_sync`."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from server.store.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("Rill's migrations run through `python -m server.store upgrade`, not the alembic command")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
