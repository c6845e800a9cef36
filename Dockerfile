# One image for worker, beat and Flower (compose.yaml's x-app anchor).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CONVEYOR_HEALTH_DIR=/tmp/conveyor-health \
    CONVEYOR_LOG_FORMAT=json

RUN useradd --create-home --uid 10001 conveyor \
    && mkdir -p /var/lib/conveyor \
    && chown conveyor /var/lib/conveyor

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py flowerconfig.py ./
COPY tasks ./tasks
COPY workers ./workers
COPY core ./core
COPY monitoring ./monitoring
COPY console ./console
COPY outbox ./outbox
COPY deploy/rabbitmq/definitions.py ./deploy/rabbitmq/definitions.py
# The outbox extra (psycopg): the relay and the exporter's outbox metrics run from this image.
RUN pip install '.[outbox]'

# Celery refuses nothing as root, but a task should never run with root's rights.
USER conveyor
CMD ["celery", "-A", "tasks", "worker", "--loglevel=INFO"]
