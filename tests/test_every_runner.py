"""The same guarantees from every runner, on real processes (tests/deployment.py):

    inprocess         the API process does the work (TASK_BACKEND=inprocess)
    celery-rabbitmq   the API publishes hints; two Celery workers on RabbitMQ do the work
    celery-redis      the same on Redis

The Celery runners need PostgreSQL (TEST_DATABASE_URL); on SQLite they are skipped.
"""

import pytest
from standardwebhooks import Webhook

from tests.conftest import csv_of
from tests.support import images
from tests.support.deployment import (
    RUNNERS,
    WEBHOOK_SECRET,
    RequestState,
    assert_completed_with_one_output_each,
    assert_webhook_delivered_once,
    local_stored_keys,
    slow_batch,
)
from tests.support.servers import UnpublishedImage

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_small_batch_is_not_stuck_behind_a_big_one(runner, deploy, image_server):
    # Taken in arrival order, the big batch would hold every download slot for about 3 s
    # (with two Celery workers; 6 s in process); taking turns, the small one starts
    # as soon as a slot frees.
    deployment = deploy(runner)
    big = deployment.upload(slow_batch(image_server, 240, delay_seconds=0.2))
    deployment.wait_done(big, at_least=1)
    small = deployment.upload(slow_batch(image_server, 3, delay_seconds=0))

    small_state = deployment.wait_done(small, timeout=60)
    big_state = deployment.request_state(big)

    assert small_state.status == "completed"
    assert big_state.status == "processing", big_state


@pytest.mark.parametrize("runner", RUNNERS)
def test_each_image_is_stored_once_and_the_webhook_sent_once(
    runner, deploy, image_server, webhook_receiver, tmp_path
):
    deployment = deploy(runner)
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(slow_batch(image_server, 30, delay_seconds=0.02), hook)

    deployment.wait_done(request_id, timeout=60)

    assert_completed_with_one_output_each(deployment, request_id, 30, local_stored_keys(tmp_path / "media"))
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_catalogue_stored_after_its_answer_is_processed_and_its_webhook_sent_once(
    runner, deploy, image_server, webhook_receiver, tmp_path
):
    deployment = deploy(runner, BACKGROUND_IMPORT_ROWS="4")
    hook = webhook_receiver.new_url()
    accepted = deployment.api.post(
        "/upload",
        files={"file": ("products.csv", slow_batch(image_server, 30, delay_seconds=0), "text/csv")},
        data={"webhook_url": hook},
    )
    assert accepted.status_code == 202, accepted.text
    assert (accepted.json()["status"], accepted.json()["total_images"]) == ("importing", 30)
    request_id = accepted.json()["request_id"]

    deployment.wait_done(request_id, timeout=60)

    assert_completed_with_one_output_each(deployment, request_id, 30, local_stored_keys(tmp_path / "media"))
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


@pytest.mark.parametrize("runner", RUNNERS)
def test_sigkill_of_the_process_doing_the_work_mid_batch(
    runner, deploy, image_server, webhook_receiver, tmp_path
):
    """In process, the API is killed and started again; with Celery, one worker of two is
    killed and the other carries on alone."""
    count = 90
    deployment = deploy(runner)
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(slow_batch(image_server, count, delay_seconds=0.1), hook)
    before = deployment.wait_done(request_id, at_least=count // 3)
    assert before.status == "processing", before

    if deployment.celery:
        deployment.kill_worker(0)
    else:
        deployment.kill_api()
        deployment.start_api()
    deployment.wait_done(request_id, timeout=90)

    assert deployment.claimed_again(request_id) > 0  # the killed process held images
    assert_completed_with_one_output_each(
        deployment, request_id, count, local_stored_keys(tmp_path / "media")
    )
    assert_webhook_delivered_once(deployment, webhook_receiver, hook, request_id)


@pytest.mark.parametrize("runner", RUNNERS)
def test_retried_failed_images_are_done_by_the_runner_and_the_request_finishes_again(
    runner, deploy, image_server, webhook_receiver
):
    deployment = deploy(runner)
    unpublished = [UnpublishedImage(images.jpeg((64, 48))) for _ in range(4)]
    late = [image_server.add_handler(image, ".jpg") for image in unpublished]
    good = [image_server.add(images.jpeg((64, 48)), suffix=".jpg") for _ in range(2)]
    hook = webhook_receiver.new_url()
    request_id = deployment.upload(csv_of([(1, "P", late[:2] + good), (2, "Q", late[2:])]), hook)
    assert deployment.wait_done(request_id, timeout=60) == RequestState("completed_with_errors", 6, 2, 4)
    (first,) = webhook_receiver.wait_for(hook, 1, timeout=30)

    for image in unpublished:
        image.published.set()
    retried = deployment.api.post(f"/requests/{request_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "processing" and retried.json()["retried_images"] == 4

    assert deployment.wait_done(request_id, timeout=60) == RequestState("completed", 6, 6, 0)
    received = webhook_receiver.wait_for(hook, 2, timeout=30)
    assert len(received) == 2
    assert received[1].headers["webhook-id"] != first.headers["webhook-id"]
    payload = Webhook(WEBHOOK_SECRET).verify(received[1].body, received[1].headers)
    assert (payload["status"], payload["processed_images"], payload["failed_images"]) == ("completed", 6, 0)
    assert all(key is not None for key in deployment.output_keys(request_id))
