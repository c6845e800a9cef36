"""Flower's configuration file: `celery -A tasks flower` reads it from the working directory.

Flower has already applied FLOWER_* variables and the command line when it executes this file,
so the check sees the final address and authentication. Everything else is configured with
FLOWER_* variables (see docs/monitoring.md), so that one place, the environment, decides;
FLOWER_BROKER_API and FLOWER_BASIC_AUTH may also come from *_FILE paths (Docker secrets).
"""

from tornado.options import options

from monitoring.flower import (
    apply_secret_files,
    check,
    keep_retry_until_next_attempt,
    verify_management_api_with_broker_ca,
)

apply_secret_files(options)
check(options)
verify_management_api_with_broker_ca()
keep_retry_until_next_attempt()
