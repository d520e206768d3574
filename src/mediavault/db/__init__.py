"""PostgreSQL: pool set-up and migrations. The SQL of each aggregate lives in its domain module."""

from mediavault.db.migrate import migrate
from mediavault.db.pool import close_pool, create_pool

__all__ = ["close_pool", "create_pool", "migrate"]
