from __future__ import annotations

import hashlib
import hmac

import pytest

from tasks.webhooks import MAX_PAYLOAD_BYTES, sign, validate_request


def test_the_body_is_compact_sorted_json() -> None:
    assert validate_request("https://example.com/h", "e", {"b": 1, "a": 2}) == b'{"a":2,"b":1}'


@pytest.mark.parametrize(
    ("url", "event", "payload", "message"),
    [
        ("example.com/h", "e", {}, "absolute http"),
        ("file:///etc/passwd", "e", {}, "absolute http"),
        ("https://example.com", "", {}, "non-empty string"),
        ("https://example.com", "e", [1], "JSON object"),
        ("https://example.com", "e", {"x": "y" * MAX_PAYLOAD_BYTES}, "the limit is"),
    ],
)
def test_bad_input_is_refused_with_the_reason(
    url: str, event: str, payload: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_request(url, event, payload)  # type: ignore[arg-type]


def test_the_signature_is_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(b"s3cret", b"{}", hashlib.sha256).hexdigest()
    assert sign(b"{}", "s3cret") == expected
