"""Logging of every process of the service: LOG_FORMAT=text|json, LOG_LEVEL.

Lines about an image carry `request_id` and `image_id` (WorkUnit.log_fields); the API
writes one access line per HTTP request (`method`, `route`, `status`, `duration_ms`).
Fields given as `extra` are appended as key=value in text and as keys in JSON.

Secrets never reach the output: API keys and the webhook secret are replaced wherever
they appear, as are presigned-URL signatures and credentials (X-Amz-Signature, ...).
"""

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
# Query parameters of presigned URLs (SigV4 and SigV2) that grant access.
_PRESIGNED = re.compile(
    r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=)[^&\s\"']+",
    re.IGNORECASE,
)
_WEBHOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
# Attributes every LogRecord has; anything else was given as `extra`.
# uvicorn adds `color_message`, the same message with terminal colour codes.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class Redactor:
    def __init__(self, secrets: list[str]):
        # Longest first, so a key that contains another is replaced whole.
        self.secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _WEBHOOK_SECRET.sub(REDACTED, text)
        return _PRESIGNED.sub(rf"\1{REDACTED}", text)


def _extras(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor):
        super().__init__(TEXT_FORMAT)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return self.redact(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(
    log_format: str = "text",
    level: str = "INFO",
    *,
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every logger's lines to one handler on `stream` (stderr), in `log_format`;
    returns the handler. Uvicorn's and Celery's loggers propagate to it."""
    redact = Redactor(secrets or [])
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if log_format == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler


def secrets_of(settings) -> list[str]:
    """The configured values that must never be logged."""
    return [
        *settings.api_key_list,
        settings.webhook_secret,
        settings.metrics_token,
        settings.aws_secret_access_key,
        settings.aws_session_token,
    ]
