"""S3 credentials written in the settings' .env file reach boto3, which by itself reads
only the process environment."""

from app.composition import storage_config
from app.config import Settings
from app.storage import build_storage
from tests.support.s3_server import TEST_REGION


def test_s3_credentials_in_the_env_file_are_used(tmp_path, monkeypatch, moto_server, s3_admin, bucket):
    # Nothing in the process environment or in files boto3's chain would find.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    env_file = tmp_path / "service.env"
    env_file.write_text(
        f"STORAGE_BACKEND=s3\nS3_BUCKET={bucket}\nS3_ENDPOINT_URL={moto_server.endpoint_url}\n"
        f"AWS_ACCESS_KEY_ID=from-the-env-file\nAWS_SECRET_ACCESS_KEY=secret-from-the-env-file\n"
        f"AWS_DEFAULT_REGION={TEST_REGION}\n"
    )
    settings = Settings(_env_file=env_file, media_root=tmp_path / "media")
    storage = build_storage(storage_config(settings))
    assert storage.check() is None
    storage.save("request/1.jpg", b"output bytes")
    assert s3_admin.get_object(Bucket=bucket, Key="request/1.jpg")["Body"].read() == b"output bytes"
