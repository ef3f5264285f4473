"""The SQL family: one SQLAlchemy code path for SQLite and PostgreSQL."""
