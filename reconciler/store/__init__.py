"""PostgreSQL adapter: the only place (with devstack) that imports psycopg."""
