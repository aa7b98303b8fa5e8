"""Standard Webhooks signatures (https://www.standardwebhooks.com/)."""

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24


def secret_key(secret: str) -> bytes:
    """The HMAC key of a whsec_<base64> secret; ValueError if the secret is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the part after {SECRET_PREFIX!r} is not valid base64 ({exc})") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the key is {len(key)} bytes; at least {MIN_SECRET_BYTES} are needed")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, webhook_id, timestamp, body)
    return headers
