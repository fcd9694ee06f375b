"""Alembic migrations of the predictions store (a package so that installs carry them)."""
