"""A URL named by several rows of one request is fetched and compressed once; every row
gets its output URL and counts as a row; the request still finishes exactly once."""

from sqlalchemy import select

from app.db.models import Image
from app.db.session import writer_sessionmaker
from app.ledger.units import ImageOutcome
from app.tasks import process_image
from tests.conftest import csv_of, unique_path, upload, wait_finished
from tests.support import images
from tests.test_process import event_count, make_batch, request_row, services  # noqa: F401


def test_a_url_in_40_rows_is_fetched_once_and_every_row_gets_its_output(client, image_server, media_root):
    shared = image_server.add(images.jpeg())
    own = [image_server.add(images.jpeg()) for _ in range(40)]
    rows = [(n + 1, f"SKU{n + 1}", [own[n], shared]) for n in range(40)]
    response = upload(client, csv_of(rows))
    assert response.json()["total_images"] == 80
    status = wait_finished(client, response.json()["request_id"], timeout=60)
    while status["next_cursor"]:
        more = client.get(f"/status/{status['request_id']}", params={"cursor": status["next_cursor"]}).json()
        status["products"] += more["products"]
        status["next_cursor"] = more["next_cursor"]
    assert image_server.hits_for(shared) == 1
    assert all(image_server.hits_for(url) == 1 for url in own)
    assert status["status"] == "completed"
    assert status["progress"]["processed_images"] == 80 and status["progress"]["failed_images"] == 0
    shared_outputs = {product["output_image_urls"][1] for product in status["products"]}
    assert len(status["products"]) == 40 and len(shared_outputs) == 1 and "" not in shared_outputs
    assert all(product["images"][1]["status"] == "succeeded" for product in status["products"])
    assert len(list(media_root.glob("*/*.jpg"))) == 41  # outputs; thumbnails are in */thumbs/
    result_csv = client.get(f"/download/{status['request_id']}").text
    assert result_csv.count(shared_outputs.pop()) == 40


def test_a_failing_shared_url_fails_every_row_naming_it(client, image_server):
    missing = image_server.base_url + unique_path(".jpg")  # answers 404, counted for this test only
    good = image_server.add(images.jpeg())
    response = upload(client, csv_of([(1, "A", [missing, good]), (2, "B", [missing]), (3, "C", [missing])]))
    status = wait_finished(client, response.json()["request_id"])
    assert image_server.hits_for(missing) == 1
    assert status["status"] == "completed_with_errors"
    assert status["progress"] == {
        "total_images": 4,
        "succeeded_images": 1,
        "processed_images": 1,
        "failed_images": 3,
        "cancelled_images": 0,
        "reused_images": 0,
        "percent": 100.0,
    }
    errors = [product["images"][0]["error"]["code"] for product in status["products"]]
    assert errors == ["http_404"] * 3


def test_copies_are_never_claimed_and_the_source_records_them_exactly_once(
    services,  # noqa: F811
    image_server,
):
    shared = image_server.add(images.jpeg())
    request_pk, ids = make_batch(
        services.engine, [(1, "A", [shared]), (2, "B", [shared]), (3, "C", [shared])], "https://h.example/x"
    )
    source, *copies = ids
    assert services.ledger.claim_images(copies) == []
    (unit,) = services.ledger.claim_images([source])
    assert unit.copies == 2
    outcome = services.stages.run(unit)
    first = services.ledger.record_outcomes([outcome])
    again = services.ledger.record_outcomes([outcome])
    assert len(first) == 1 and again == []
    request = request_row(services.engine, request_pk)
    assert (request.succeeded_images, request.failed_images, request.status) == (3, 0, "completed")
    assert event_count(services.engine, request_pk) == 1
    with writer_sessionmaker(services.engine)() as session:
        rows = session.execute(select(Image.status, Image.output_key).where(Image.id.in_(ids))).all()
    assert {row.status for row in rows} == {"succeeded"} and len({row.output_key for row in rows}) == 1
    assert process_image(services.ledger, services.stages, copies[0]) == []


def test_a_sources_result_goes_to_its_own_copies_only(services, image_server):  # noqa: F811
    """Two URLs, each in two rows, in two requests: recording the first URL's source gives
    its copy the result, and leaves the other URL's copies waiting for theirs."""
    first, second = image_server.add(images.jpeg()), image_server.add(images.jpeg())
    first_pk, (source, copy) = make_batch(services.engine, [(1, "A", [first]), (2, "B", [first])])
    second_pk, second_ids = make_batch(services.engine, [(1, "C", [second]), (2, "D", [second])])
    _, same_request_ids = make_batch(
        services.engine, [(1, "E", [second]), (2, "F", [second]), (3, "G", [image_server.add(images.jpeg())])]
    )
    (unit,) = services.ledger.claim_images([source])
    services.ledger.record_outcomes([services.stages.run(unit)])
    with writer_sessionmaker(services.engine)() as session:
        status = dict(session.execute(select(Image.id, Image.status)).all())
    assert (status[source], status[copy]) == ("succeeded", "succeeded")
    assert [status[i] for i in second_ids + same_request_ids] == [
        "pending",
        "copy",
        "pending",
        "copy",
        "pending",
    ]
    assert request_row(services.engine, first_pk).status == "completed"
    assert request_row(services.engine, second_pk).succeeded_images == 0


def test_a_cancelled_source_gives_its_copies_nothing_and_the_cancel_counts_them(services, image_server):  # noqa: F811
    """A cancel in batches: the first batch cancels the other row's image while the source
    is in flight; the source's outcome comes back cancelled (its request is cancelling);
    its copy, past that batch, waits for the next batch and is counted cancelled, not
    failed with its source."""
    shared = image_server.add(images.jpeg())
    request_pk, (source, other, copy) = make_batch(
        services.engine, [(1, "A", [shared]), (2, "B", [image_server.add(images.jpeg())]), (3, "C", [shared])]
    )
    (unit,) = services.ledger.claim_images([source])
    first_batch = services.ledger.cancel(request_pk, limit=1)
    assert (first_batch.cancelled_images, first_batch.last_image_id) == (1, other)
    services.ledger.record_outcomes([ImageOutcome(unit, cancelled=True)])
    with writer_sessionmaker(services.engine)() as session:
        assert session.get(Image, copy).status == "copy"
    assert services.ledger.cancel(request_pk, limit=1, after_image_id=other).cancelled_images == 1
    request = request_row(services.engine, request_pk)
    assert (request.status, request.cancelled_images, request.failed_images) == ("cancelled", 3, 0)
