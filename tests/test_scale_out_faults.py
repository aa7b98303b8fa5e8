"""Faults in a Celery deployment (tests/deployment.py: the API and two workers), each with
both brokers, on a batch of a few hundred slow images with a webhook:

    a worker SIGKILLed mid-batch         the other carries on; the dead one's claims expire
    the broker's queue emptied           the workers' sweep publishes a new hint
    the API SIGKILLed after the 202      workers need nothing from it, webhooks included
    the S3 endpoint down for 10 s        images wait and are retried when it is back

Each time the request completes, each image is stored once (one file or object per
image, listed), and the webhook arrives once.
"""

import time

import pytest

from tests.conftest import stored_keys
from tests.support.deployment import (
    CELERY_RUNNERS,
    assert_completed_with_one_output_each,
    assert_webhook_delivered_once,
    local_stored_keys,
    slow_batch,
)
from tests.support.s3_server import TEST_REGION

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("runner", CELERY_RUNNERS)]

IMAGE_COUNT = 240
# 16 downloads at a time (two workers of 8): about 3 s for the batch without faults.
SERVE_DELAY_SECONDS = 0.2
S3_OUTAGE_SECONDS = 10


@pytest.fixture
def batch(image_server) -> bytes:
    return slow_batch(image_server, IMAGE_COUNT, SERVE_DELAY_SECONDS)


def test_sigkill_one_of_two_workers_mid_batch(runner, deploy, batch, webhook_receiver, tmp_path):
    deployment = deploy(runner)
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(batch, hook)
    assert deployment.wait_done(request_id, at_least=IMAGE_COUNT // 4).status == "processing"

    deployment.kill_worker(0)
    deployment.wait_done(request_id)

    assert deployment.claimed_again(request_id) > 0  # the dead worker held claims
    assert_completed_with_one_output_each(
        deployment, request_id, IMAGE_COUNT, local_stored_keys(tmp_path / "media")
    )
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


def test_broker_queue_emptied_mid_batch(runner, deploy, batch, webhook_receiver, tmp_path):
    deployment = deploy(runner)
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(batch, hook)
    assert deployment.wait_done(request_id, at_least=IMAGE_COUNT // 4).status == "processing"

    deployment.purge_queue()
    deployment.wait_done(request_id)

    assert_completed_with_one_output_each(
        deployment, request_id, IMAGE_COUNT, local_stored_keys(tmp_path / "media")
    )
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


def test_api_sigkilled_right_after_the_upload(runner, deploy, batch, webhook_receiver, tmp_path):
    deployment = deploy(runner)
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(batch, hook)
    deployment.kill_api()

    deployment.wait_done(request_id)

    assert not deployment.api.running
    assert_completed_with_one_output_each(
        deployment, request_id, IMAGE_COUNT, local_stored_keys(tmp_path / "media")
    )
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


def test_s3_endpoint_down_for_10_seconds_mid_batch(
    runner, deploy, batch, webhook_receiver, aws_environment, running_s3_proxy, s3_admin, bucket
):
    # Dummy credentials reach the processes through the environment (aws_environment).
    deployment = deploy(
        runner,
        STORAGE_BACKEND="s3",
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=running_s3_proxy.url,
        S3_REGION=TEST_REGION,
    )
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(batch, hook)
    assert deployment.wait_done(request_id, at_least=IMAGE_COUNT // 4).status == "processing"

    running_s3_proxy.pause()
    time.sleep(S3_OUTAGE_SECONDS)
    during = deployment.request_state(request_id)
    running_s3_proxy.resume()
    deployment.wait_done(request_id)

    assert during.status == "processing", during  # images waited for the storage
    assert_completed_with_one_output_each(deployment, request_id, IMAGE_COUNT, stored_keys(s3_admin, bucket))
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)
