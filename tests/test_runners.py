"""The same guarantees from every runner, on real processes (tests/deployment.py):

    inprocess         the API process does the work (TASK_BACKEND=inprocess)
    celery-rabbitmq   the API publishes hints; two Celery workers on RabbitMQ do the work
    celery-redis      the same on Redis

The Celery runners need PostgreSQL (TEST_DATABASE_URL); on SQLite they are skipped.
"""

import pytest

from tests.deployment import (
    RUNNERS,
    assert_completed_with_one_output_each,
    assert_webhook_delivered_once,
    local_stored_keys,
    slow_batch,
)

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
