import base64
import re

import pytest
from pydantic import ValidationError

from app.config import PROJECT_ROOT, Settings


def test_every_setting_is_documented_in_env_example():
    documented = set(
        re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", (PROJECT_ROOT / ".env.example").read_text(), re.M)
    )
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


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_abc",  # not base64 (bad padding)
        "whsec_",
        "whsec_" + base64.b64encode(b"k" * 23).decode(),  # one byte short
        "whsec_" + base64.b64encode(b"k" * 32).decode() + "!",
        "whsec_"
        + base64.b64encode(b"k" * 30).decode()[:20]
        + " "
        + base64.b64encode(b"k" * 30).decode()[20:],
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # base64url, not base64
    ],
)
def test_a_malformed_webhook_secret_is_refused_at_start_up_naming_the_setting(monkeypatch, secret):
    monkeypatch.setenv("WEBHOOK_SECRET", secret)
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    assert "WEBHOOK_SECRET" in str(refused.value)
    key_text = secret.removeprefix("whsec_")
    assert not key_text or key_text not in str(refused.value)  # the secret is not echoed


def test_a_secret_of_24_random_bytes_is_accepted():
    secret = "whsec_" + base64.b64encode(b"\xfb\xff" * 12).decode()
    assert Settings(_env_file=None, webhook_secret=secret).webhook_secret == secret


def test_celery_on_sqlite_stops_the_service_at_start_up_saying_why(tmp_path):
    import subprocess
    import sys

    env = {
        "PATH": "/usr/bin:/bin",
        "TASK_BACKEND": "celery",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'images.db'}",
        "MEDIA_ROOT": str(tmp_path / "media"),
    }
    for command in (["-m", "app"], ["-m", "celery", "--app", "app.runners.celery_worker", "worker"]):
        done = subprocess.run(
            [sys.executable, *command], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        assert "TASK_BACKEND=celery needs a database every worker can reach" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "images.db").exists()


def test_renamed_settings_still_read_their_old_names(monkeypatch):
    monkeypatch.setenv("WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("WORKER_MEMORY_MB", "100")
    settings = Settings(_env_file=None)
    assert (settings.image_concurrency, settings.image_memory_mb) == (3, 100)
    monkeypatch.setenv("IMAGE_CONCURRENCY", "5")
    assert Settings(_env_file=None).image_concurrency == 5
