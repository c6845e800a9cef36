"""Creates the Celery app. Domain modules import `app` from here, never the other way round."""

import logging

from celery import Celery
from kombu.utils.imports import symbol_by_name

import workers
from core import config

#: Each feature's `connect(app)`, which wires its signal handlers and before-start hooks
#: (tasks.base.on_before_start): the one way a feature extends every task or process. Named,
#: like `include`, so that this module never imports the domain modules.
EXTENSIONS = ("tasks.schedule.hooks:connect",)

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
if config.broker_url_unset():
    logging.getLogger("conveyor.config").warning(
        "CELERY_BROKER_URL is unset: using the built-in default, guest on 127.0.0.1:5672 vhost /"
    )
if backend_class:
    app.backend_cls = backend_class
if app.conf.conveyor_signing:
    # Registers the auth serializer and refuses every other content type.
    app.setup_security()
workers.install(app)
for extension in EXTENSIONS:
    symbol_by_name(extension)(app)
