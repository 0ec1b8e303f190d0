"""One worker thread for a blocking resource (a sqlite3 connection).

sqlite3 connections must stay on the thread that made them, and the event loop
must never wait on disk: every call to the resource goes through ``run`` and
executes, in order, on the one thread this object owns.  Used by the head-end
store and the meters' NVM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class SingleThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
