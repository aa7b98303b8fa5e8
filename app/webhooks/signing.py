"""Standard Webhooks signatures (https://www.standardwebhooks.com/)."""

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, webhook_id, timestamp, body)
    return headers
