"""Re-imports: what an owner's earlier requests learned about each source URL.

    attach_revalidation(session, units)   after a claim, one query: each unit whose URL
                                          this owner imported before gets a Revalidation
                                          (validators, hash, the output stored for its
                                          encoding), which the fetch stage sends as
                                          If-None-Match / If-Modified-Since
    remember_sources(session, outcomes)   when outcomes are recorded: the new validators
                                          and, per encoding, the output now stored

Scoped by owner (the API key; "" when the API is open): one key never learns from, or
reuses the outputs of, another. A source that said Cache-Control: no-store is remembered
as such and never revalidated or reused. The output named here belongs to the request
that stored it (or copied it last); the stages copy it under the new request's keys, so
deleting either request leaves the other's outputs alone, and an output whose request
is gone is simply encoded again.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ProcessingRequest, SourceOutput, SourceValidators
from app.ledger.units import (
    EncodingKeys,
    ImageOutcome,
    Revalidation,
    SourceState,
    StoredOutput,
    WorkUnit,
)


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def owner_scope(owner: str | None) -> str:
    return owner or ""


# Built once, as the ledger's claim statements: run beside every claim.
_EARLIER_IMPORTS = (
    select(
        ProcessingRequest.id.label("request_pk"),
        SourceValidators.url_sha256,
        SourceValidators.etag,
        SourceValidators.last_modified,
        SourceValidators.content_sha256,
        SourceOutput.encoding,
        SourceOutput.output_key,
        SourceOutput.content_type,
        SourceOutput.thumbnail_key,
        SourceOutput.input_bytes,
        SourceOutput.output_bytes,
        SourceOutput.width,
        SourceOutput.height,
        SourceOutput.source_format,
        SourceOutput.kept_original,
    )
    .select_from(ProcessingRequest)
    .join(SourceValidators, SourceValidators.owner_scope == func.coalesce(ProcessingRequest.owner, ""))
    .outerjoin(
        SourceOutput,
        and_(
            SourceOutput.source_id == SourceValidators.id,
            SourceOutput.encoding.in_(bindparam("encodings", expanding=True)),
        ),
    )
    .where(
        ProcessingRequest.id.in_(bindparam("request_pks", expanding=True)),
        SourceValidators.url_sha256.in_(bindparam("url_hashes", expanding=True)),
        SourceValidators.no_store.is_(False),
    )
)
_OWNERS = select(ProcessingRequest.id, ProcessingRequest.owner).where(
    ProcessingRequest.id.in_(bindparam("request_pks", expanding=True))
)
_SOURCE_IDS = select(SourceValidators.id, SourceValidators.owner_scope, SourceValidators.url_sha256).where(
    SourceValidators.owner_scope.in_(bindparam("scopes", expanding=True)),
    SourceValidators.url_sha256.in_(bindparam("url_hashes", expanding=True)),
)


def attach_revalidation(
    session: Session, units: Sequence[WorkUnit], encodings: EncodingKeys
) -> list[WorkUnit]:
    """The units, each with what its owner's earlier imports of its URL left (if any).
    `encodings` names each unit's encoding (its options and the output policy)."""
    if not units:
        return list(units)
    hashes = {unit.image_id: url_sha256(unit.input_url) for unit in units}
    wanted = {unit.image_id: encodings.of(unit.options) for unit in units}
    rows = (
        session.connection()
        .execute(
            _EARLIER_IMPORTS,
            {
                "encodings": sorted({encoding for encoding in wanted.values() if encoding}),
                "request_pks": sorted({unit.request_pk for unit in units}),
                "url_hashes": sorted(set(hashes.values())),
            },
        )
        .all()
    )
    sources: dict[tuple[int, str], SourceState] = {}
    outputs: dict[tuple[int, str, str], StoredOutput] = {}
    for row in rows:
        sources[row.request_pk, row.url_sha256] = SourceState(
            content_sha256=row.content_sha256, etag=row.etag, last_modified=row.last_modified
        )
        if row.encoding is not None:
            outputs[row.request_pk, row.url_sha256, row.encoding] = StoredOutput(
                key=row.output_key,
                content_type=row.content_type,
                thumbnail_key=row.thumbnail_key,
                input_bytes=row.input_bytes,
                output_bytes=row.output_bytes,
                width=row.width,
                height=row.height,
                source_format=row.source_format,
                kept_original=row.kept_original,
            )
    attached = []
    for unit in units:
        source = sources.get((unit.request_pk, hashes[unit.image_id]))
        if source is None:
            attached.append(unit)
            continue
        output = outputs.get((unit.request_pk, hashes[unit.image_id], wanted[unit.image_id]))
        attached.append(replace(unit, revalidation=Revalidation(source, output)))
    return attached


VALIDATOR_COLUMNS = ("etag", "last_modified", "content_sha256", "no_store", "updated_at")
OUTPUT_COLUMNS = (
    "output_key",
    "content_type",
    "thumbnail_key",
    "input_bytes",
    "output_bytes",
    "width",
    "height",
    "source_format",
    "kept_original",
    "updated_at",
)


@lru_cache(maxsize=4)
def _upserts(dialect: str):
    """The two upserts, built once per dialect: one statement run with many parameter
    sets is compiled once (a VALUES list of rows was compiled anew for every batch and
    cost a millisecond an image)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    validators = insert(SourceValidators.__table__)
    outputs = insert(SourceOutput.__table__)
    return (
        validators.on_conflict_do_update(
            index_elements=["owner_scope", "url_sha256"],
            set_={name: validators.excluded[name] for name in VALIDATOR_COLUMNS},
        ),
        outputs.on_conflict_do_update(
            index_elements=["source_id", "encoding"],
            set_={name: outputs.excluded[name] for name in OUTPUT_COLUMNS},
        ),
    )


def remember_sources(session: Session, outcomes: Sequence[ImageOutcome], encodings: EncodingKeys) -> None:
    """Store what these just-recorded successes learned about their sources, in the
    caller's transaction: one upsert of validators, one of outputs. Outcomes of requests
    deleted meanwhile are left out (their outputs are being removed)."""
    learned = [o for o in outcomes if o.succeeded and o.source is not None]
    if not learned:
        return
    owners = dict(
        session.connection()
        .execute(_OWNERS, {"request_pks": sorted({o.unit.request_pk for o in learned})})
        .all()
    )
    now = utcnow()
    latest: dict[tuple[str, str], tuple[ImageOutcome, SourceState]] = {}
    for outcome in learned:
        if outcome.unit.request_pk in owners and outcome.source is not None:
            scope = owner_scope(owners[outcome.unit.request_pk])
            latest[scope, url_sha256(outcome.unit.input_url)] = (outcome, outcome.source)
    if not latest:
        return
    connection = session.connection()
    upsert_validators, upsert_outputs = _upserts(connection.dialect.name)
    # Sorted, so two transactions upserting the same sources lock them in the same order.
    keys = sorted(latest)
    connection.execute(
        upsert_validators,
        [
            {
                "owner_scope": scope,
                "url_sha256": url_hash,
                "url": latest[scope, url_hash][0].unit.input_url,
                "etag": latest[scope, url_hash][1].etag,
                "last_modified": latest[scope, url_hash][1].last_modified,
                "content_sha256": latest[scope, url_hash][1].content_sha256,
                "no_store": latest[scope, url_hash][1].no_store,
                "updated_at": now,
            }
            for scope, url_hash in keys
        ],
    )
    source_ids = {
        (row.owner_scope, row.url_sha256): row.id
        for row in connection.execute(
            _SOURCE_IDS,
            {"scopes": sorted({scope for scope, _ in keys}), "url_hashes": sorted({h for _, h in keys})},
        )
    }
    stored: dict[tuple[int, str], dict] = {}
    for key in keys:
        outcome, source = latest[key]
        options = outcome.unit.options or encodings.default_options
        encoding = encodings.of(outcome.unit.options)
        if (
            source.no_store
            or options is None
            or encoding is None
            or not outcome.output_key
            or key not in source_ids
        ):
            continue
        stored[source_ids[key], encoding] = {
            "source_id": source_ids[key],
            "encoding": encoding,
            "output_key": outcome.output_key,
            "content_type": outcome.content_type or options.content_type,
            "thumbnail_key": outcome.thumbnail_key,
            "input_bytes": outcome.input_bytes,
            "output_bytes": outcome.output_bytes,
            "width": outcome.width,
            "height": outcome.height,
            "source_format": outcome.source_format,
            "kept_original": outcome.kept_original,
            "updated_at": now,
        }
    if not stored:
        return
    connection.execute(upsert_outputs, [stored[key] for key in sorted(stored)])
