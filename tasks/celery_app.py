"""Creates the Celery app. Domain modules import `app` from here, never the other way round."""

import logging

from celery import Celery

import workers
from core import config

app = Celery(
    "tasks",
    # Strings, so that this module never imports the domain modules (no import cycle).
    include=["tasks.webhooks", "tasks.batch.tasks", "tasks.schedule.jobs"],
    task_cls="tasks.base:Task",
)
app.config_from_object("celeryconfig")
try:
    # The first read imports celeryconfig, which refuses a bad setting with one line.
    backend_class = app.conf.conveyor_result_backend_class
except config.ConfigurationError as error:
    config.exit_on_command_line(error)  # `celery ...`: the line and exit status 2
    raise  # a web app gets the exception, its message that one line
if app.conf.broker_url == config.DEFAULT_BROKER_URL:
    logging.getLogger("conveyor.config").warning(
        "CELERY_BROKER_URL is unset: using the built-in default, guest on 127.0.0.1:5672 vhost /"
    )
if backend_class:
    app.backend_cls = backend_class
if app.conf.conveyor_signing:
    # Registers the auth serializer and refuses every other content type.
    app.setup_security()
workers.install(app)
