"""Creates the Celery app. Domain modules import `app` from here, never the other way round."""

from celery import Celery

import workers

app = Celery(
    "tasks",
    # Strings, so that this module never imports the domain modules (no import cycle).
    include=["tasks.webhooks", "tasks.batch.tasks", "tasks.schedule.jobs"],
    task_cls="tasks.base:Task",
)
app.config_from_object("celeryconfig")
if app.conf.conveyor_result_backend_class:
    app.backend_cls = app.conf.conveyor_result_backend_class
if app.conf.conveyor_signing:
    # Registers the auth serializer and refuses every other content type.
    app.setup_security()
workers.install(app)
