"""The threads the shim daemon runs blocking work in (runtime-core calls), off its loop.

Not `concurrent.futures.ThreadPoolExecutor`: its submit() starts a missing thread and
waits, on the loop, until that thread runs, which under load (other workers busy in
Python, holding the GIL) was measured at 90-400 ms of a frozen loop during 20
parallel Creates. Here a thread is started without waiting for it, and the job waits
in the queue until some thread takes it. Threads live as long as the daemon and are
not joined at exit (a worker stuck in a hook must not hold the daemon's exit).
"""

import _thread
import asyncio
import queue
import threading


class Workers:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one count per thread waiting for a job
        self._started = 0

    def submit(self, loop: asyncio.AbstractEventLoop, call) -> asyncio.Future:
        """CALL() in a worker thread; the future (of LOOP) gets its result or exception.
        Jobs beyond `limit` running at once wait for a free thread."""
        future = loop.create_future()
        self._jobs.put((loop, future, call))
        if not self._idle.acquire(blocking=False) and self._started < self._limit:
            self._started += 1  # only the loop's thread submits
            _thread.start_new_thread(self._work, ())
        return future

    def _work(self) -> None:
        while True:
            loop, future, call = self._jobs.get()
            try:
                outcome = (_set_result, future, call())
            except BaseException as e:  # noqa: BLE001 - handed to the caller, whatever it is
                outcome = (_set_exception, future, e)
            try:
                loop.call_soon_threadsafe(*outcome)
            except RuntimeError:
                return  # the loop is closed: the daemon is exiting
            finally:
                outcome = None  # no reference cycle through the exception's traceback
            self._idle.release()


def _set_result(future: asyncio.Future, result) -> None:
    if not future.cancelled():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(error)
