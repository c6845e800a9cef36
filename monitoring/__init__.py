"""Processes that watch Conveyor: the Prometheus exporter, `overview`, queue figures and
Flower's configuration. Monitoring may read every layer; no layer imports monitoring."""
