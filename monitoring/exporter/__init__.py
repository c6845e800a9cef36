"""Prometheus exporter for what Flower does not show: `celery -A tasks exporter`.

It is its own process (compose service ``exporter``) and combines two sources:
- the broker, read at every scrape (monitoring/queue_stats.py): depth (ready, unacked) and
  consumers per task queue, the dead-letter queue and the delayed-delivery queues;
- the Celery event stream, consumed by a thread: how long tasks wait between being sent and
  being started, the oldest task still waiting per queue, retries and failures per task.

Other parts of Conveyor add their own metrics (batch progress, last run per schedule entry)
without touching this module: ``conveyor_metrics_collectors`` lists ``"module:factory"`` paths;
each factory is called with the app and returns a prometheus_client Collector.
"""
