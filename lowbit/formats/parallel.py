"""Worker threads for the few loops whose iterations are independent torch work (torch releases the GIL
inside each op, so two Python threads keep two cores busy even with intra-op threading set to 1)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

WORKERS = min(2, os.cpu_count() or 1)


@lru_cache(maxsize=None)
def worker_pool(name: str) -> ThreadPoolExecutor:
    """The process-wide pool called ``name`` (created on first use, ``WORKERS`` threads).

    Each use site has its own pool: a task running in one pool may wait on tasks of another (GPTQ's row
    halves wait on their MSE-search candidates), which would deadlock if they shared workers.
    """
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"lowbit-{name}")
