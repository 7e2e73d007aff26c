"""PostgreSQL adapter: the only place (with devstack) that imports psycopg.

Services use the :class:`~reconciler.store.port.RegionStore` port (``port.py``),
implemented on PostgreSQL by ``postgres_store.py`` (statements in ``postgres.py``,
``quarantine.py`` and the other modules here) and in memory by ``memory.py``.
``inspection.py`` holds the drills' own reads; ``demo_domain.py`` the demo tables'.
"""
