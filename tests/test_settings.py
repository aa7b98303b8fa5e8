import re

import pytest
from pydantic import ValidationError

from app.config import PROJECT_ROOT, Settings


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", (PROJECT_ROOT / ".env.example").read_text(), re.M))
    assert {name.upper() for name in Settings.model_fields} <= documented


def test_env_example_values_are_valid(monkeypatch):
    for line in (PROJECT_ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z_]+=", line):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.jpeg_quality == 50
    assert settings.base_url == "http://127.0.0.1:8000"


def test_webhook_secret_must_be_a_standard_webhooks_secret():
    with pytest.raises(ValidationError):
        Settings(_env_file=None, webhook_secret="plain-text")
