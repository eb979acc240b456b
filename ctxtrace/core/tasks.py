"""How the asyncio task an access was made in ended: for accesses outside any unit.

Outside a unit of work an access's outcome is judged by the frame that caught its
error (``sites.caught_by_application``). An error that ends an asyncio task is
caught in the event loop's C code, so the outermost frame of its traceback is the
task's own coroutine, exactly as when the coroutine catches it: the frame cannot
tell the two apart, the task's end can.
"""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import Any


class TaskEnd:
    """One task's end once it has come, and the error it died of, if any.

    Registered as the task's done callback, once per task.
    """

    __slots__ = ("ended", "error")

    def __init__(self) -> None:
        self.ended = False
        self.error: BaseException | None = None

    def __call__(self, task: Any) -> None:
        # The private ``_exception`` of both Task implementations, not ``exception()``:
        # that would mark the error retrieved and silence the loop's own
        # "Task exception was never retrieved" for an application that never asked.
        error = getattr(task, "_exception", None)
        self.error = error if isinstance(error, BaseException) else None
        self.ended = True


class TaskEnds:
    """The ``TaskEnd`` of every task that made an access outside any unit."""

    def __init__(self) -> None:
        # Weak: a finished task goes when the application lets go of it; an access
        # waiting for the sweep keeps its ``TaskEnd``, not the task.
        self._ends: weakref.WeakKeyDictionary[Any, TaskEnd] = weakref.WeakKeyDictionary()

    def of_running_task(self, asyncio: ModuleType) -> TaskEnd | None:
        """The end of the task running on this thread, watched from now on; ``None`` if
        a plain callback runs. Called only where an event loop runs here: the caller
        asks ``asyncio._get_running_loop()`` itself, as an access pays for it."""
        task = asyncio.current_task()
        if task is None:
            return None
        end = self._ends.get(task)
        if end is None:
            end = self._ends[task] = TaskEnd()
            task.add_done_callback(end)
        return end
