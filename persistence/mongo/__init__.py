"""The MongoDB backend: Beanie 2 on PyMongo's async client (the `mongodb` extra)."""
