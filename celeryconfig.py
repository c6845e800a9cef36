"""Every Celery setting Conveyor uses, with the reason for each non-obvious value.

Any plain setting can be overridden from the environment as ``CELERY_<NAME>`` (for example
``CELERY_WORKER_CONCURRENCY=4`` or ``CELERY_TASK_TIME_LIMIT=600``); the value is parsed to the
setting's type and refused when it does not fit. Some settings have variables of their own,
read where they are set. The overrides are applied before the settings derived from others
(queues, TLS, the broker list) are computed, at the end: define new settings above that
section. The machinery is core/config.py; docs/configuration.md has the table.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from core.config import (
    DEFAULT_BROKER_URL,
    ConfigurationError,
    apply_overrides,
    broker_tls,
    broker_urls,
    env,
    one_of,
    optional_secret,
    secret,
)

# --- Broker and result backend -------------------------------------------------------------
#: Unset, a local RabbitMQ's guest user on vhost "/": tasks/celery_app.py logs a line saying so.
broker_url = secret("CELERY_BROKER_URL", DEFAULT_BROKER_URL)
result_backend = secret("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
#: Celery's Redis backend subscribes to every task's result channel inside apply_async, read or
#: not: a Redis command per delay() and subscriptions that pile up in a long-lived producer.
#: This subclass subscribes when the caller waits (AsyncResult.get); see core/results.py.
#: "" selects Celery's own class for result_backend's URL.
conveyor_result_backend_class = "core.results:RedisBackend"

# --- RabbitMQ cluster: failover and replication (docs/scaling.md) ------------------------------
#: CELERY_BROKER_URL may list every node of a cluster, separated by ";". kombu always connects
#: to the first URL first, so every client would crowd onto the first node. Each process takes
#: the nodes in its own random order instead (false keeps the order given); see
#: broker_read_url below.
conveyor_broker_shuffle: bool = env("CONVEYOR_BROKER_SHUFFLE", True)
#: After losing its node a client tries each other node once, in its own order, before coming
#: back to the dead one (kombu's "shuffle" draws with replacement and may pick it again).
broker_failover_strategy = "round-robin"
#: Replicas per quorum queue (x-quorum-initial-group-size). 0 sends no argument: RabbitMQ puts
#: one on every cluster node, right for 3 or 5 nodes. Larger clusters set 3 or 5. RabbitMQ
#: checks it on every declaration, so every producer, worker and provisioning run must use the
#: same value, and changing it means new queues.
conveyor_quorum_group_size: int = env("CONVEYOR_QUORUM_GROUP_SIZE", 0)
#: Celery's consumer with workers/failover.py's delayed-delivery step (the stock step retries
#: every URL of the list, dead nodes included, for 9 s each on every reconnection) and
#: core/events.py's event connection without publisher confirms (see the events section).
worker_consumer = "workers.failover:Consumer"

# --- TLS to the broker ------------------------------------------------------------------------
#: With an amqps:// URL the broker's certificate is always verified, against this CA bundle
#: (the system's trust store when unset), and its name checked against the URL's host
#: (broker_use_ssl, derived below). A client certificate is sent when the last two are set.
conveyor_broker_tls_ca: str | None = env("CONVEYOR_BROKER_TLS_CA", None)
conveyor_broker_tls_cert: str | None = env("CONVEYOR_BROKER_TLS_CERT", None)
conveyor_broker_tls_key: str | None = env("CONVEYOR_BROKER_TLS_KEY", None)

#: Never run tasks in the calling process: a missing broker must be an error, not a fallback.
task_always_eager = False

# --- Serialization: JSON only ----------------------------------------------------------------
# Pickle lets anyone who can publish run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# --- Delivery guarantees -----------------------------------------------------------------------
task_acks_late = True  # ack after the task returns, so a crash mid-task redelivers it ...
task_reject_on_worker_lost = True  # ... and requeue if its pool process dies (celery#1628)
worker_prefetch_multiplier = 1  # one reserved message per process: no task waits behind a slow one
#: A task that raised is finished; redelivering it would only repeat the failure. Retries are
#: explicit (autoretry_for / self.retry), bounded by max_retries.
task_acks_on_failure = True
task_acks_on_timeout = True
#: Let running tasks finish when the broker connection is lost (Celery 6.0 will default to
#: cancelling them). Their ack cannot reach the broker, so the message is redelivered either
#: way; what cancelling changes is that the running copy is killed mid-effect (SIGTERM to its
#: pool process), between an idempotent effect and its done-marker, and the redelivery then
#: repeats the effect (seen in the F8 chaos run). Finishing lets run_once record the effect, so
#: the redelivered copy finds it done. The cost is a task possibly running beside its
#: redelivered copy for as long as it takes.
worker_cancel_long_running_tasks_on_connection_loss = False
#: Shown as STARTED in Flower and AsyncResult.state while running.
task_track_started = True

# --- Queues: quorum, delivery-limited, dead-lettered --------------------------------------------
#: Deliveries before RabbitMQ dead-letters a message. RabbitMQ 3.10 quorum queues have no
#: default limit, so a task that kills its process would loop forever. Broker restarts and
#: lost connections also count, so this leaves room for a few of those before poison.
conveyor_delivery_limit: int = env("CONVEYOR_DELIVERY_LIMIT", 10)
conveyor_task_exchange = "conveyor"
conveyor_dead_letter_exchange = "conveyor.dlx"
conveyor_dead_letter_queue = "conveyor.dead_letter"
#: Task queues. `priority` is for urgent work: quorum queues have no message priority on 3.10,
#: so urgency is a separate queue that dedicated workers serve (see compose.yaml). Each is
#: declared (task_queues, at the end) quorum, with the limit and dead-letter exchange above.
conveyor_queue_names = ("default", "batch", "scheduled", "priority")

#: Messages published to `conveyor` that match no queue go here instead of vanishing (RabbitMQ
#: confirms and drops unroutable messages; Celery never sets `mandatory`). workers/bad_input.py
#: declares the exchange and its queue.
conveyor_unroutable_exchange = "conveyor.unroutable"
conveyor_unroutable_queue = "conveyor.unroutable"
task_default_queue = "default"
task_default_routing_key = "default"
#: Topic, not Celery's default direct: native delayed delivery (countdown/ETA held by the
#: broker in celery_delayed_* queues, never by the worker) only works with non-direct exchanges.
task_default_exchange_type = "topic"
task_default_queue_type = "quorum"
#: Only the queues named above exist; a typo in a route must fail, not create a stray queue.
task_create_missing_queues = False
#: Routing lives here, not in decorators: the task name's domain picks the queue.
task_routes = {
    "batch.*": {"queue": "batch"},
    "schedule.*": {"queue": "scheduled"},
    "urgent.*": {"queue": "priority"},
}

# --- Publishing: confirmed and bounded ---------------------------------------------------------
#: Publisher confirms: delay() returns only after the broker has taken the message
#: (celery#5410: without confirms a publish can vanish silently).
broker_transport_options: dict[str, Any] = {"confirm_publish": True}
task_publish_retry = True
#: About 3 s of retrying a lost connection, then the caller gets OperationalError.
task_publish_retry_policy = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
#: Seconds a publish may wait for a socket write and for the broker's confirm
#: (memory/disk alarms block publishers: celery#2689). Applied by tasks.base.Task.
conveyor_publish_timeout: float = env("CONVEYOR_PUBLISH_TIMEOUT", 10.0)
broker_connection_timeout = 4
#: Producers declare the task queue before their first publish, which needs `configure`
#: permission on it. With the least-privilege producer role (deploy/rabbitmq) set this to
#: false: provisioning declares the topology, and the producer only publishes.
conveyor_declare_on_publish: bool = env("CONVEYOR_DECLARE_ON_PUBLISH", True)
#: Waiting for a pooled producer connection is bounded too (celery#9259).
broker_pool_acquire_timeout = 10
#: Workers keep reconnecting for as long as the broker is away: they must resume by
#: themselves when it comes back. Producers are bounded by the publish retry policy instead.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
#: Heartbeats detect a half-open connection (a frozen broker) in about 2 x 30 s.
broker_heartbeat = 30

# --- Time limits -------------------------------------------------------------------------------
#: RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout (30 min by
#: default), which kills a Celery worker. Both limits sit below it.
task_soft_time_limit = 1500  # 25 min: the task gets SoftTimeLimitExceeded and can clean up
task_time_limit = 1620  # 27 min: the pool process is killed

# --- Worker process --------------------------------------------------------------------------
#: Pool processes per worker; None means one per CPU.
worker_concurrency: int | None = None
#: Processes, not threads: only a process can be killed at task_time_limit and replaced at
#: worker_max_memory_per_child. "threads" costs less CPU per task but keeps neither (see
#: docs/performance.md); the worker's --pool flag overrides this.
worker_pool = "prefork"
#: Replace a pool process after a task leaves it above this (KiB): leaks cannot grow forever.
worker_max_memory_per_child = 512_000
#: On SIGTERM/SIGQUIT, running tasks get this long to finish before they are requeued.
#: compose.yaml's stop_grace_period is longer.
worker_soft_shutdown_timeout = 20.0
worker_enable_soft_shutdown_on_idle = True
#: Conveyor configures logging itself (workers/logs.py), in one of two formats: json for log
#: shippers (the container image sets it), keyvalue for people. A bad value stops every command
#: with one line here, not a traceback from the logging setup.
worker_hijack_root_logger = False
conveyor_log_format: str = one_of("CONVEYOR_LOG_FORMAT", "keyvalue", ("json", "keyvalue"))
conveyor_log_level: str = one_of(
    "CONVEYOR_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
)

# --- Results -----------------------------------------------------------------------------------
result_expires = 86_400  # 1 day; results are for reading back, not for keeping
result_extended = True  # keep task name, args and queue with the result for operators
#: Redis briefly away must not turn results into silent None (celery#8588); the bound keeps
#: the retries well under consumer_timeout.
result_backend_always_retry = True
result_backend_max_retries = 10
#: Chord bookkeeping must outlive the longest batch, or its body never runs.
result_chord_expires = 7 * 86_400

# --- Events and remote control (Flower, inspect) ------------------------------------------------
worker_send_task_events = True
task_send_sent_event = True
#: Events are transient, so their connections skip publisher confirms; task messages keep
#: them. Each confirmed event cost a broker round trip: one more per delay(), three per task
#: in the worker's main loop (docs/performance.md, core/events.py). The worker's side is
#: in its consumer class, worker_consumer (cluster section: workers.failover builds on it).
#: Beat answers `celery inspect ping` as celerybeat@<host>, which its healthcheck uses.
beat_enable_remote_control = True

# --- Time ----------------------------------------------------------------------------------------
timezone: str = env("CONVEYOR_TIMEZONE", "UTC")
enable_utc = True

# --- Reliability ---------------------------------------------------------------------------------
#: Serialized args + kwargs above this are refused at the producer (ArgumentsTooLarge): messages
#: carry ids, not data, and a big message stalls a quorum queue's replication. RabbitMQ's own
#: max_message_size (128 MiB on 3.10) is far above it.
conveyor_max_argument_bytes: int = env("CONVEYOR_MAX_ARGUMENT_BYTES", 1_000_000)
#: A channel error (above all PRECONDITION_FAILED when a delivery outlived the broker's
#: consumer_timeout, e.g. after the broker was frozen) restarts the consumer instead of ending
#: the worker with "Unrecoverable error" (celery#6760; found by the F9 chaos run). Unacked
#: messages go back to the queue and are redelivered.
broker_channel_error_retry = True
#: Where idempotency markers live (tasks/idempotency.py); the result Redis by default.
conveyor_idempotency_url = optional_secret("CONVEYOR_IDEMPOTENCY_URL") or result_backend
#: HMAC-SHA256 key for outgoing webhooks' X-Conveyor-Signature (tasks/webhooks.py); None: unsigned.
conveyor_webhook_secret = optional_secret("CONVEYOR_WEBHOOK_SECRET")
#: Seconds for a webhook's connect + response: a hanging subscriber must not hold a worker.
conveyor_webhook_timeout: float = env("CONVEYOR_WEBHOOK_TIMEOUT", 10.0)
#: How long "this effect already ran" is remembered: longer than any redelivery or replay.
conveyor_idempotency_ttl = 7 * 86_400
#: Seconds a delivery holds an effect's key while running it. A killed holder blocks the key
#: this long; a slower effect must pass a longer lease.
conveyor_idempotency_lease = 60.0
#: A delivery that finds the key leased waits out the lease's remaining time and tries again,
#: apart from its transient-error retries (tasks/base.py). Each wait ends with the holder done
#: or its lease expired, so this many in a row means holder after holder was killed: the task
#: is dead-lettered rather than waiting forever.
conveyor_idempotency_lease_waits = 10


# --- Batches (tasks/batch, docs/batch.md) --------------------------------------------------------
#: Redis holding batch state; None means the result backend's Redis.
conveyor_batch_redis_url: str | None = None
#: Batch state expires this long after the batch's last change: longer than the longest batch
#: (like result_chord_expires), and long enough to read a finished batch's result and failures.
conveyor_batch_expires = 7 * 86_400
#: Items per chunk message when the caller gives none: enough to amortize the per-message cost
#: for real work (docs/batch.md has the figures), small enough that a crash redoes little.
#: Trivial items go faster with 10,000.
conveyor_batch_chunk_size = 1000
#: Chunk messages a producer may have unconfirmed at once: confirms are pipelined, and this
#: bound makes a slow or blocked broker slow the producer down instead of queueing locally.
conveyor_batch_max_unconfirmed = 100
#: Unconfirmed messages in flight for tasks.bulk.enqueue_many: small task messages, so a deeper
#: pipeline than for chunks (about raw AMQP's rate at 1,000; the broker still paces it).
conveyor_bulk_max_unconfirmed = 1000
#: A producer's task-sent events go out as one list per this many tasks (Celery's receivers
#: read a list as that many events), and at the latest this many seconds after the publish,
#: from a background thread: one event publish per task cost a third of a single delay()'s CPU
#: and a quarter of a bulk enqueue's. Monitors see a task-sent event up to the interval late.
conveyor_sent_event_batch = 100
conveyor_sent_event_interval = 0.1
#: Tries of an item that raised a transient error (TransientItemError, ConnectionError,
#: TimeoutError), with a backoff that starts here and doubles (seconds), before it fails.
conveyor_batch_item_attempts = 3
conveyor_batch_item_backoff = 0.2

# --- Monitoring --------------------------------------------------------------------------------
#: RabbitMQ management API, for the exporter and `celery -A tasks overview`: adds unacked and
#: delayed counts. Unset, they read ready messages and consumers with passive queue declares.
conveyor_rabbitmq_api = optional_secret("CONVEYOR_RABBITMQ_API")
#: Extension points for other parts of Conveyor (batches, schedules): "module:factory" paths.
#: A metrics factory takes the app and returns a prometheus_client Collector (monitoring/exporter/);
#: an overview section takes the app and returns (title, rows) (monitoring/overview.py).
conveyor_metrics_collectors: list[str] = [
    "monitoring.batch:collector",
    "monitoring.schedule:collector",
]
conveyor_overview_sections: list[str] = [
    "monitoring.batch:overview_section",
    "monitoring.schedule:overview_section",
]

# --- Message signing (optional) -----------------------------------------------------------
#: Off by default. When on, every task message is signed with this process's key and only
#: messages signed by a certificate in the store are accepted (Celery's auth serializer:
#: signed, not encrypted). Producers and workers all need a key, a certificate and the store.
conveyor_signing: bool = env("CONVEYOR_SIGNING", False)
conveyor_signing_key: str = env("CONVEYOR_SIGNING_KEY", "")
conveyor_signing_cert: str = env("CONVEYOR_SIGNING_CERT", "")
#: A glob of the certificates whose signatures are trusted, for example certs/*.pem.
conveyor_signing_cert_store: str = env("CONVEYOR_SIGNING_CERT_STORE", "")

# --- Scheduling ----------------------------------------------------------------------------------
#: celery-redbeat keeps the schedule in Redis (editable at runtime, kept across restarts) and
#: lets only the holder of a Redis lock fire; Conveyor's subclass adds a standby that keeps
#: answering ping and the missed-run policy. See docs/scheduling.md.
beat_scheduler = "tasks.schedule.scheduler:ConveyorScheduler"
#: Its own variable, so the schedule can live apart from results; the result Redis by default.
redbeat_redis_url = optional_secret("CONVEYOR_SCHEDULE_REDIS_URL") or result_backend
#: Explicit, so redbeat does not fall back to the broker's transport options.
redbeat_redis_options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5}
redbeat_key_prefix = "redbeat:"
#: A killed beat's lock expires after this; a standby retries every beat_max_loop_interval,
#: so another beat takes over within 20 + 5 = 25 s. The active beat renews it every tick.
redbeat_lock_timeout = 20
beat_max_loop_interval = 5
#: Install the entries of tasks/schedule/entries.py (tests turn this off).
conveyor_beat_builtin_entries = True


# --- Bounded reads of task states ---
#: Seconds an `AsyncResult(id).state` (or .result, .ready()) may take when Redis is down or
#: frozen before it raises celery.exceptions.BackendGetMetaError: a web request reading a state
#: must answer in seconds, not wait out the ~15 s of retries a worker's result store is given
#: (result_backend_always_retry, which keeps protecting stored results). core/results.py.
conveyor_result_read_timeout: float = env("CONVEYOR_RESULT_READ_TIMEOUT", 3.0)


# --- Console (console/, docs/console.md) ---
#: Flower's address as operators' browsers reach it: the console's header links to it, and
#: task ids link to Flower's task page. None: no links.
conveyor_flower_url: str | None = env("CONVEYOR_FLOWER_URL", None)
#: The exporter's /metrics, where the console reads each queue's oldest waiting task (the
#: exporter follows task events; the console does not). None: that column shows "-".
conveyor_exporter_url: str | None = env("CONVEYOR_EXPORTER_URL", None)
#: Seconds between two checks of the dead-letter queue's depth; the console re-reads the queue
#: (a basic.get per message) only when the depth changed, after an action, or every 10 minutes.
conveyor_console_dead_letter_refresh = 5.0
#: Bytes of each dead letter's body the console keeps for its preview: memory stays about a
#: kilobyte a message, whatever the bodies weigh.
conveyor_console_dead_letter_preview = 512


# --- Outbox (outbox/, docs/outbox.md) ---
#: PostgreSQL URL (postgresql://...) of the database holding conveyor_outbox, for the relay,
#: `celery -A tasks outbox migrate` and the exporter. Unset: no outbox (docs/outbox.md).
conveyor_outbox_url = optional_secret("CONVEYOR_OUTBOX_URL")
#: Rows one relay publishes per transaction. It is also the duplicate bound: a relay killed
#: between the broker's confirms and its commit leaves at most this many rows to be published
#: again, under the same task ids.
conveyor_outbox_batch_size: int = env("CONVEYOR_OUTBOX_BATCH_SIZE", 500)
#: Seconds between polls when no NOTIFY arrives (a notification lost with a dropped connection).
conveyor_outbox_poll_interval: float = env("CONVEYOR_OUTBOX_POLL_INTERVAL", 1.0)
#: Seconds a published row is kept (for audits and `SELECT`s), then deleted: 7 days.
conveyor_outbox_retention: int = env("CONVEYOR_OUTBOX_RETENTION", 604800)
conveyor_outbox_cleanup_interval = 60.0
#: Seconds the relay waits after a failure (broker or database away) before trying again.
conveyor_outbox_retry_interval: float = env("CONVEYOR_OUTBOX_RETRY_INTERVAL", 1.0)


# --- Environment overrides, then the settings derived from the final values --------------------
#: Settings computed below from others: an override of one would not reach its sources.
_DERIVED = {
    "task_queues": "set CELERY_CONVEYOR_DELIVERY_LIMIT, CELERY_CONVEYOR_DEAD_LETTER_EXCHANGE, ...",
    "broker_use_ssl": "set CONVEYOR_BROKER_TLS_CA, _CERT, _KEY with an amqps:// URL",
    "conveyor_broker_urls": "set CELERY_BROKER_URL",
    "task_default_exchange": "set CELERY_CONVEYOR_TASK_EXCHANGE",
    "security_key": "set CONVEYOR_SIGNING_KEY",
    "security_certificate": "set CONVEYOR_SIGNING_CERT",
    "security_cert_store": "set CONVEYOR_SIGNING_CERT_STORE",
}
apply_overrides(globals(), derived=_DERIVED)

#: The cluster's nodes in this process's order (conveyor_broker_shuffle). Celery reads the
#: CELERY_BROKER_URL variable in preference to broker_url, but these two in preference to both,
#: so the order reaches every connection without rewriting the environment.
conveyor_broker_urls = broker_urls(broker_url, shuffle=conveyor_broker_shuffle)
broker_url = ";".join(conveyor_broker_urls)
broker_read_url = broker_write_url = broker_url if len(conveyor_broker_urls) > 1 else None
broker_use_ssl = broker_tls(
    broker_url,
    ca=conveyor_broker_tls_ca,
    cert=conveyor_broker_tls_cert,
    key=conveyor_broker_tls_key,
)

_task_exchange = Exchange(
    conveyor_task_exchange,
    type="topic",
    durable=True,
    arguments={"alternate-exchange": conveyor_unroutable_exchange},
)
_queue_arguments: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": conveyor_delivery_limit,
    "x-dead-letter-exchange": conveyor_dead_letter_exchange,
    # At-least-once dead-lettering (3.10+): the broker keeps a message until the dead-letter
    # queue has confirmed it, instead of dropping it if that hop fails. It requires
    # reject-publish overflow; no max-length is set, so nothing is rejected for length.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
if conveyor_quorum_group_size:
    _queue_arguments["x-quorum-initial-group-size"] = conveyor_quorum_group_size
task_queues = tuple(
    Queue(name, _task_exchange, routing_key=name, queue_arguments=_queue_arguments, durable=True)
    for name in conveyor_queue_names
)
task_default_exchange = conveyor_task_exchange

if conveyor_signing:
    task_serializer = "auth"
    accept_content = ["auth"]
    security_key = conveyor_signing_key
    security_certificate = conveyor_signing_cert
    security_cert_store = conveyor_signing_cert_store
    security_digest = "sha256"
    if not (security_key and security_certificate and security_cert_store):
        raise ConfigurationError(
            "CONVEYOR_SIGNING=on needs CONVEYOR_SIGNING_KEY, CONVEYOR_SIGNING_CERT and "
            "CONVEYOR_SIGNING_CERT_STORE"
        )

if conveyor_outbox_url:
    # Only with an outbox: otherwise every scrape and overview would fail to connect.
    conveyor_metrics_collectors = [*conveyor_metrics_collectors, "monitoring.outbox:collector"]
    conveyor_overview_sections = [*conveyor_overview_sections, "monitoring.outbox:overview_section"]
