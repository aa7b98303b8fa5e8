"""Several `make worker` on one host: each names itself (worker-<pid>@<host>), so the
broker sees distinct workers (RabbitMQ refuses a second worker of the same name with
ResourceLocked), unless WORKER_NAME names it."""

import pytest

from tests.support.deployment import BROKER_URLS, NEEDS_POSTGRES, slow_batch

pytestmark = pytest.mark.slow


@NEEDS_POSTGRES
@pytest.mark.parametrize("runner", list(BROKER_URLS))
def test_two_make_workers_on_one_host_both_run(deploy, runner, image_server):
    deployment = deploy(runner, workers=0)
    deployment.start_worker(named=False)
    deployment.start_worker(named=False)
    request_id = deployment.upload(slow_batch(image_server, 8, 0.2, per_row=1))
    assert deployment.wait_done(request_id).status == "completed"
    assert all(worker.running for worker in deployment.workers)
    for worker in deployment.workers:
        assert f"worker-{worker.process.pid}@" in worker.log_path.read_text()


@NEEDS_POSTGRES
def test_worker_name_names_the_worker(deploy):
    deployment = deploy("celery-rabbitmq", workers=0, WORKER_NAME=f"named-{id(deploy)}@%h")
    deployment.start_worker(named=False)
    assert f"named-{id(deploy)}@" in deployment.workers[0].log_path.read_text()
