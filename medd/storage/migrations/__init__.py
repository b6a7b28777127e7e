"""Alembic's migration environment for the index: env.py and one script a
revision in versions/. :mod:`medd.storage.migrate` runs them."""
