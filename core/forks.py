"""A child of a plain ``os.fork()`` publishes on broker connections of its own.

Celery drops an app's connection pool and producer pool in a forked child only when billiard
or multiprocessing made the child (their after-fork hooks call ``app._after_fork``). A child of
a plain ``os.fork()`` (gunicorn with ``preload_app``, uwsgi without ``lazy-apps``) kept both:
if the parent had published before the fork, the child's first publish went out on the
parent's pooled socket, its frames interleaved with the parent's on one AMQP connection. Every
app that publishes through Conveyor's task class is tracked here and gets Celery's and kombu's
own after-fork cleanup in such a child: the pools are dropped, not closed (an AMQP close from the
child would end the connection the parent still uses), and the child's first publish opens a
connection of its own.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from kombu import pools

_apps: weakref.WeakSet[Any] = weakref.WeakSet()


def track(app: Any) -> None:
    """Give `app` Celery's after-fork cleanup in every plain fork child from now on."""
    _apps.add(app)


def _after_fork_in_child() -> None:
    if not _apps:
        return
    # Celery's and kombu's cleanup for billiard children: kombu's process-wide pool groups
    # (where an app's pool lives) cleared, then each app's references dropped. Running it twice
    # in one child (billiard's pool children get both hooks) only drops pools that are
    # already new and empty.
    pools.connections.clear()
    pools.producers.clear()
    for app in list(_apps):
        app._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
