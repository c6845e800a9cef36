"""`conveyor_summary`: what `celery -A tasks overview` shows of a worker, in one reply.

Celery's own inspect commands answer one question per broadcast, and a broadcast always
waits its whole timeout (nobody knows how many workers will answer): the overview's three
(stats, active, active_queues) took three timeouts. This command answers all three at once.
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command


@inspect_command()
def conveyor_summary(state: Any) -> dict[str, Any]:
    """Pool size, tasks running now, tasks processed since start, queues consumed."""
    consumer = state.consumer
    stats = consumer.controller.stats()
    task_consumer = consumer.task_consumer
    return {
        "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
        "active": len(worker_state.active_requests),
        "processed": sum((stats.get("total") or {}).values()),
        "queues": sorted(queue.name for queue in task_consumer.queues) if task_consumer else [],
    }
