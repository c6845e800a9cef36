"""Code both sides of the broker use: producers (web apps, CLIs) and worker processes.

It holds the Celery classes a producer and a worker share (sent events, the result backend)
and small helpers with one job each. It imports neither `tasks`, `workers` nor `monitoring`.
"""
