"""Alembic environment: always driven programmatically by app.db.run_migrations with an open connection."""

from __future__ import annotations

from alembic import context

from app.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through app.db.run_migrations (it passes the connection)")

# render_as_batch: SQLite can only ALTER tables by copying them, which batch mode does.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
