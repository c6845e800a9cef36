"""OpenTelemetry tracing, off unless an OTLP endpoint is configured.

Set ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and every pool
process of a worker, and beat, sends its spans there over OTLP/HTTP; ``OTEL_SERVICE_NAME``
and the other standard ``OTEL_*`` variables apply. The instrumentation puts the trace context
in each message's headers, so a task's span is a child of the span that published it.

Set up per process, after the fork (``worker_process_init``): the span processor's export
thread does not survive a fork. A web app that publishes tasks calls ``init_tracing()`` once at
start-up (or uses its own TracerProvider and calls ``instrument()``), so its publishes carry
the context too.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def enabled() -> bool:
    """Tracing is on only when an exporter endpoint is configured."""
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def instrument() -> None:
    """Instrument Celery's publish and run signals with the current TracerProvider."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def init_tracing(service_name: str = "conveyor") -> bool:
    """Export spans over OTLP/HTTP and instrument Celery; False (and nothing done) when off."""
    if not enabled():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    instrument()
    logger.info("tracing enabled for %s", name)
    return True


def _on_worker_process_init(**_: Any) -> None:
    init_tracing("conveyor-worker")


def _on_beat_init(**_: Any) -> None:
    init_tracing("conveyor-beat")


def _on_worker_process_shutdown(**_: Any) -> None:
    # Flush what the pool process still holds before it exits (recycled or shutting down).
    if not enabled():
        return
    from opentelemetry import trace

    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()


def connect() -> None:
    signals.worker_process_init.connect(_on_worker_process_init, weak=False)
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
    signals.beat_init.connect(_on_beat_init, weak=False)
