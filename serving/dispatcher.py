"""The dispatcher: one replica that hands every queued job of the store to the generator deployment.

On start it puts the jobs that were running when the application stopped back in the queue (or fails those that
were interrupted too often, saying so), so that every accepted job finishes or tells why it did not. It then passes
each queued job to the generators as one request: waiting jobs are waiting requests, which is what Serve's
autoscaler counts, so generator replicas scale with the queue. A job whose generator replica died goes back to the
queue the same way. The API wakes it after each submission; it also looks by itself every dispatch_interval_s.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from .config import ServingConfig
from .store import JobStore

logger = logging.getLogger(__name__)


@serve.deployment(num_replicas=1)  # its CPUs and node labels come from the config (serving/app.py)
class Dispatcher:
    async def __init__(self, config: ServingConfig, generator: DeploymentHandle) -> None:
        self.store = JobStore(config.database_url)
        self.generator = generator
        self.max_attempts = config.max_attempts
        self.interval_s = config.dispatch_interval_s
        requeued, failed = await asyncio.to_thread(
            self.store.requeue, None, self.max_attempts, "the application stopped"
        )
        if requeued or failed:
            logger.warning("after a restart: %d running job(s) requeued, %d failed", len(requeued), len(failed))
        self._dispatched: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._loop = asyncio.create_task(self._dispatch_forever())

    async def __del__(self) -> None:
        # Serve calls this when the replica stops: stop looking for jobs before the worker threads go away.
        self._loop.cancel()

    def wake(self) -> None:
        """Look for queued jobs now (a job was just submitted)."""
        self._wake.set()

    async def _dispatch_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                for job_id in await asyncio.to_thread(self.store.queued):
                    if job_id not in self._dispatched:
                        self._dispatched[job_id] = asyncio.create_task(self._run(job_id))
            except Exception:  # noqa: BLE001 - a database hiccup must not end dispatching; the next round retries
                logger.exception("dispatching queued jobs failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass

    async def _run(self, job_id: str) -> None:
        try:
            await self.generator.run.remote(job_id)
        except Exception as error:  # noqa: BLE001 - the replica died or stopped mid-job: requeue it (or fail it)
            first_line = next(iter(str(error).strip().splitlines()), "")  # Ray's errors go on for pages
            reason = f"generator stopped: {type(error).__name__}: {first_line}"
            logger.warning("job %s: %s", job_id, reason)
            await asyncio.to_thread(self.store.requeue, [job_id], self.max_attempts, reason)
        finally:
            del self._dispatched[job_id]
