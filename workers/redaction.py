"""Keep every Redis URL's password out of `celery inspect conf` and Flower's config view.

Celery masks settings whose names match its HIDDEN_SETTINGS pattern (API, KEY, PASS, ...) and
the password in broker and result-backend URLs, but not other URLs: `redbeat_redis_url` (and
any `*_redis_url` of ours) would be shown with its password. Adding REDIS_URL to the pattern
masks those values whole.
"""

from __future__ import annotations

import re

from celery.app import utils


def install() -> None:
    namespace = vars(utils)  # the stubs do not declare HIDDEN_SETTINGS
    hidden: re.Pattern[str] = namespace["HIDDEN_SETTINGS"]
    if "REDIS_URL" not in hidden.pattern:
        namespace["HIDDEN_SETTINGS"] = re.compile(hidden.pattern + "|REDIS_URL", re.IGNORECASE)
