"""Flower's configuration file: `celery -A tasks flower` reads it from the working directory.

Flower has already applied FLOWER_* variables and the command line when it executes this file,
so the check sees the final address and authentication. Everything else is configured with
FLOWER_* variables (see docs/monitoring.md), so that one place, the environment, decides.
"""

from tornado.options import options

from workers.flower import check, verify_management_api_with_broker_ca

check(options)
verify_management_api_with_broker_ca()
