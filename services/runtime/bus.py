"""NATS connection, idempotent JetStream topology, event encoding and reading back history."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoServersError
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from services.contracts import subjects
from services.contracts.events import (
    DEPLOYMENT_EVENT,
    Command,
    DeploymentEvent,
    DeploymentRequested,
    Event,
)
from services.contracts.routing import message_id_for, subject_for
from services.runtime import aio
from services.runtime.settings import Settings, redact_url

MSG_ID_HEADER = "Nats-Msg-Id"
CONTENT_TYPE = {"content-type": "application/json"}

log = logging.getLogger("preflight.bus")


class BusUnavailable(RuntimeError):
    """No NATS server answers at the configured URL."""


class TopologyMissing(RuntimeError):
    """A stream, KV bucket or durable consumer a service needs was never created."""


def inbox_prefix(user: str | None) -> str:
    """Where a user's replies arrive. deploy/nats/nats.conf lets each user subscribe only to its
    own prefix, so no user reads replies (pulled messages included) meant for another."""
    return f"_INBOX_{user}" if user else "_INBOX"


def connect_options(settings: Settings) -> dict[str, Any]:
    """User, password and inbox prefix for nats-py and FastStream alike."""
    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(settings.nats_user)}
    if settings.nats_user:
        options["user"] = settings.nats_user
        pw = settings.nats_password
        options["password"] = pw.get_secret_value() if pw else ""
    return options


def how_to_start(url: str) -> str:
    return (
        f"no NATS server answers at {redact_url(url)}. Start the embedded stack with "
        "`preflight up` "
        "(or set PREFLIGHT_NATS_URL to your NATS server)."
    )


async def connect(
    settings: Settings, name: str, *, timeout: float = 2.0, reconnect: bool = False
) -> NATS:
    """Connect or raise `BusUnavailable` with a one-line explanation.

    `reconnect=True` is for long-lived service connections that should ride out a server restart.
    """
    servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]
    options = connect_options(settings)

    async def quiet(_: Exception) -> None:
        """nats-py prints every failed attempt; we report once, below."""

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers,
                name=name,
                connect_timeout=timeout,
                allow_reconnect=reconnect,
                max_reconnect_attempts=-1 if reconnect else 1,
                error_cb=quiet,
                **options,
            ),
            timeout=timeout * 2,
        )
    except (NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
        if "authorization violation" in str(exc).lower():
            who = (
                f"user {settings.nats_user!r}" if settings.nats_user else "a client without a user"
            )
            raise BusUnavailable(
                f"the NATS server at {redact_url(settings.nats_url)} refused {who}: set "
                "PREFLIGHT_NATS_USER and PREFLIGHT_NATS_PASSWORD (the embedded stack's are in "
                "<data-dir>/nats/credentials.json, which the CLI reads itself)"
            ) from exc
        raise BusUnavailable(how_to_start(settings.nats_url)) from exc


# ---- topology ---------------------------------------------------------------------------------

_DAY = 86400.0


def stream_configs(settings: Settings) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            description="Deployment events, outcomes and commands (the pipeline's history).",
            subjects=[
                subjects.STAGE_SUBJECTS,
                subjects.OUTCOME_SUBJECTS,
                subjects.COMMAND_SUBJECTS,
            ],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=settings.events_duplicate_window_s,
            max_age=settings.events_max_age_days * _DAY,
            max_bytes=settings.events_max_bytes,
            max_msg_size=1024 * 1024,
            discard=api.DiscardPolicy.OLD,
            allow_direct=True,  # readers use direct get, never a consumer (nats.conf says why)
        ),
        api.StreamConfig(
            name=subjects.METRICS_STREAM,
            description="Request-metric batches from routers and gateways.",
            subjects=[subjects.METRICS_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            max_age=settings.metrics_max_age_s,
            max_bytes=settings.metrics_max_bytes,
            max_msg_size=8 * 1024 * 1024,
            discard=api.DiscardPolicy.OLD,
        ),
        api.StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            description="Messages a service could not take, with the reason.",
            subjects=[subjects.DEADLETTER_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=30 * _DAY,
            max_bytes=settings.deadletter_max_bytes,
            max_msg_size=9 * 1024 * 1024,
            discard=api.DiscardPolicy.OLD,
        ),
    ]


def consumer_config(
    durable: str, filter_subjects: Sequence[str], settings: Settings
) -> api.ConsumerConfig:
    """A durable pull consumer: survives restarts, shared by every instance of a service."""
    return api.ConsumerConfig(
        durable_name=durable,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        # The ingest counts attempts itself: a batch is dead-lettered only when it is to blame,
        # and waits out a store outage however long it lasts (the stream's limits bound it).
        max_deliver=-1 if durable == subjects.INGEST_DURABLE else settings.max_deliver,
        filter_subjects=list(filter_subjects),
        max_ack_pending=1000,
    )


# (stream, durable, filter subjects) of every service consumer.
CONSUMERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (subjects.EVENTS_STREAM, subjects.VALIDATOR_DURABLE, (subjects.stage_filter("requested"),)),
    (subjects.EVENTS_STREAM, subjects.BENCHMARKER_DURABLE, (subjects.stage_filter("validated"),)),
    (
        subjects.EVENTS_STREAM,
        subjects.CONTROLLER_DURABLE,
        (subjects.stage_filter("benchmarked"),),
    ),
    (subjects.EVENTS_STREAM, subjects.CONTROLLER_COMMANDS_DURABLE, (subjects.COMMAND_SUBJECTS,)),
    (
        subjects.EVENTS_STREAM,
        subjects.NOTIFIER_DURABLE,
        (subjects.OUTCOME_SUBJECTS, subjects.stage_filter("canary_step")),
    ),
    (subjects.METRICS_STREAM, subjects.INGEST_DURABLE, (subjects.METRICS_SUBJECTS,)),
)


def consumer_filters(durable: str) -> tuple[str, tuple[str, ...]]:
    for stream, name, filters in CONSUMERS:
        if name == durable:
            return stream, filters
    raise KeyError(durable)


BUCKETS: tuple[tuple[str, str, int], ...] = (
    (subjects.ROUTES_BUCKET, "Canary weight per model route; routers watch it.", 5),
    (subjects.ROLLOUTS_BUCKET, "Rollout state per deployment; the controller's truth.", 10),
    (subjects.NOTICES_BUCKET, "Notices sent per deployment (dedup, message to update).", 1),
    (subjects.LEASES_BUCKET, "Which canary-controller replica is active.", 1),
    (subjects.ROUTER_STATUS_BUCKET, "What each built-in router instance serves (heartbeat).", 1),
)


async def ensure_topology(
    js: JetStreamContext, settings: Settings, say: Callable[[str], None] | None = None
) -> None:
    """Create or update streams, KV buckets and durable consumers (`preflight bootstrap`, with
    admin rights; services only bind to what this made). Safe to run again: an upgrade's new
    limits are applied, what exists is kept."""
    tell = say or (lambda _: None)
    for config in stream_configs(settings):
        try:
            await js.add_stream(config)
            tell(f"stream {config.name}: ready")
        except BadRequestError:
            # Exists with another configuration (an upgrade changed a limit): bring it up to date.
            await js.update_stream(config)
            tell(f"stream {config.name}: updated")
    for bucket, description, history in BUCKETS:
        try:
            await js.key_value(bucket)
            tell(f"KV bucket {bucket}: exists")
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            await js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    description=description,
                    history=history,
                    storage=api.StorageType.FILE,
                    direct=True,
                )
            )
            tell(f"KV bucket {bucket}: created")
    for stream, durable, filters in CONSUMERS:
        consumer = consumer_config(durable, filters, settings)
        try:
            await js.add_consumer(stream, consumer)
        except BadRequestError as first:
            try:
                await js.add_consumer(stream, consumer)  # a concurrent start created it first
            except BadRequestError as again:
                # Ready only if it is there: "maximum consumers limit reached" and the like
                # used to be suppressed here, and bootstrap said ready for a missing durable.
                try:
                    await js.consumer_info(stream, durable)
                except NotFoundError:
                    raise TopologyMissing(
                        f"durable consumer {stream}/{durable} could not be created: "
                        f"{again.description or first.description or again}"
                    ) from again
        tell(f"durable consumer {stream}/{durable}: ready")


async def kv_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a KV bucket that hold a message (deleted ones included: `get` says so),
    read from its stream's subject counts (`$JS.API.STREAM.INFO` with a subject filter, a
    page at a time). nats-py's `KeyValue.keys()` creates a consumer on every call, which
    lingers: the controller's ticks and each unauthenticated GET of the rollout page left
    hundreds, until the server's consumer limit stopped the controller's ticks."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    keys: list[str] = []
    while True:
        request = {"subjects_filter": f"{prefix}>", "offset": len(keys)}
        info = await stream_info(js._nc, stream, request)
        subjects = (info.get("state") or {}).get("subjects") or {}
        keys += [subject.removeprefix(prefix) for subject in subjects]
        total = int(info.get("total", 0) or 0)
        if not subjects or len(keys) >= total:
            return keys


async def _answers(nc: NATS, subject: str, payload: bytes, what: str) -> AsyncGenerator[Any, None]:
    """The messages that reach a request's own inbox, until the caller stops, less those with a
    reply subject: a consumer's delivery that someone aimed at the inbox (its name is listed by
    the monitoring port's /connz). Raises BusUnavailable after 5 s with no answer (deliveries
    do not count): a request the server refuses (permissions) is never answered."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    loop = asyncio.get_running_loop()
    try:
        await nc.publish(subject, payload, reply=inbox)
        until = loop.time() + 5.0
        while True:
            try:
                msg = await sub.next_msg(timeout=max(until - loop.time(), 0.001))
            except TimeoutError as exc:
                raise BusUnavailable(
                    f"the NATS server did not answer {what} within 5 s: this user may not make "
                    "it (deploy/nats/nats.conf), or the server is overloaded"
                ) from exc
            if not msg.reply:
                yield msg
                until = loop.time() + 5.0
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def api_request(nc: NATS, subject: str, request: dict[str, Any]) -> dict[str, Any]:
    """One JetStream API call, read as the server answers: a JSON body with no headers and no
    reply subject, where nats-py's request takes the first message to reach its inbox."""
    answers = _answers(nc, subject, json.dumps(request).encode(), subject)
    async with contextlib.aclosing(answers):
        async for msg in answers:
            if msg.headers:
                continue
            try:
                answer = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(answer, dict) and str(answer.get("type", "")).startswith("io.nats."):
                return answer
    raise AssertionError("unreachable: _answers ends only by raising")


async def stream_info(nc: NATS, stream: str, request: dict[str, Any] | None = None) -> Any:
    """`$JS.API.STREAM.INFO` through api_request; a missing stream raises NotFoundError."""
    info = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", request or {})
    if "error" in info:
        raise NotFoundError(description=str(info["error"].get("description", info)))
    return info


async def kv_last(nc: NATS, bucket: str, key: str) -> tuple[int, bytes, bool] | None:
    """(revision, value, deleted) of a key's last entry, or None when it has none: a direct
    get by subject (no consumer). Only the server's answer for this stream and subject counts
    (the checks of direct_get)."""
    stream, subject = f"KV_{bucket}", f"$KV.{bucket}.{key}"
    answers = _answers(nc, f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", f"a read of {subject}")
    async with contextlib.aclosing(answers):
        async for msg in answers:
            headers = msg.headers or {}
            if headers.get("Status") == "404":
                return None
            if headers.get("Nats-Stream") != stream or headers.get("Nats-Subject") != subject:
                continue
            deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
            return int(headers["Nats-Sequence"]), msg.data, deleted
    raise AssertionError("unreachable: _answers ends only by raising")


async def require_consumers(js: JetStreamContext, durables: Sequence[str]) -> None:
    """Raise `TopologyMissing`, naming the fix, if a durable consumer a service binds to does not
    exist (services may not create them: least privilege, deploy/nats/nats.conf)."""
    for durable in durables:
        stream, _ = consumer_filters(durable)
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError as exc:
            raise TopologyMissing(
                f"durable consumer {durable!r} on stream {stream} does not exist: run "
                "`preflight bootstrap` with the admin NATS user first (docs/nats-permissions.md)"
            ) from exc


# ---- events on the wire -----------------------------------------------------------------------


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def headers_for(event: Event, nonce: str | None = None) -> dict[str, str]:
    return {MSG_ID_HEADER: message_id_for(event, nonce), **CONTENT_TYPE}


async def publish_event(js: JetStreamContext, event: Event, nonce: str | None = None) -> api.PubAck:
    """Publish one event to the events stream with its dedup id (plain nats-py path)."""

    async def publish(headers: dict[str, str]) -> api.PubAck:
        return await js.publish(
            subject_for(event), encode(event), stream=subjects.EVENTS_STREAM, headers=headers
        )

    return await publish_checked(js, event, publish, headers_for(event, nonce))


async def stored_subject(js: JetStreamContext, stream: str, seq: int) -> str | None:
    """The subject of the message stored at `seq` (direct get), or None where it cannot be read."""
    try:
        msg = await js.get_msg(stream, seq=seq, direct=True)
    except Exception:  # no right to read, a timeout, the message aged out
        log.warning("could not read back message %d of %s", seq, stream, exc_info=True)
        return None
    return msg.subject


async def publish_checked(
    js: JetStreamContext,
    event: Event,
    publish: Callable[[dict[str, str]], Awaitable[api.PubAck]],
    headers: dict[str, str],
) -> api.PubAck:
    """Publish, and make sure a "duplicate" answer is this event's own.

    Message ids are predictable (`<deployment>:promoted`) and anyone who may publish anywhere
    on the stream may put any Nats-Msg-Id on what it sends: a `client` that publishes junk
    with `<deployment>:validated` first would have JetStream drop the validator's real event as
    a duplicate, and nobody would hear of it. The server lets only some users publish on each
    kind of subject (`.validated`: the validator), so a duplicate stored on a subject of this
    event's kind is a true repeat (a retry, a sibling instance, an id reused for another
    model); one stored on another kind of subject took the id first.
    The event then goes out again under an id of its own content, and failing that a random
    one. Where the stored message cannot be read back, the duplicate is trusted as before."""
    subject, taken_id = subject_for(event), headers.get(MSG_ID_HEADER)
    content = hashlib.sha256(encode(event)).hexdigest()[:16]
    for msg_id in (taken_id, f"{taken_id}~{content}", f"{taken_id}~{secrets.token_hex(8)}"):
        ack = await publish({**headers, MSG_ID_HEADER: str(msg_id)})
        if not getattr(ack, "duplicate", False):  # a test broker's publish answers None
            return ack
        stored = await stored_subject(js, ack.stream, ack.seq)
        if stored is None or _same_kind(stored, subject):
            return ack
        log.error(
            "message id %s was taken by a message on %s (seq %d), not %s: publishing %s under "
            "another id",
            msg_id,
            stored,
            ack.seq,
            subject,
            type(event).__name__,
        )
    raise RuntimeError(f"{subject}: every message id tried was taken by another subject")


def _same_kind(stored: str, subject: str) -> bool:
    """Whether a stored message on `stored` is a repeat of one on `subject`: the same subject,
    or the same but for the model token (`preflight deploy --id d-x` reused for another
    model is deduplicated, as it always was). Who may publish where is the same for both, so
    only a user allowed on this kind of subject can have taken the id."""
    a, b = stored.split("."), subject.split(".")
    return len(a) == len(b) and a[:2] + a[3:] == b[:2] + b[3:]


async def read_history(js: JetStreamContext, filter_subject: str) -> list[DeploymentEvent]:
    """Every event in the events stream matching a filter, oldest first."""
    return [event async for event in follow(js, filter_subject, stop_when_caught_up=True)]


E = TypeVar("E")


def with_sender(event: E, subject: str) -> E:
    """A command with `requested_by.nats_user` set from its subject, the authenticated sender
    (the server lets each user publish commands only under its own name); the body's claim is
    replaced. Anything else is returned as it is."""
    if not isinstance(event, Command):
        return event
    sender = subjects.command_sender(subject)
    requester = event.requested_by.model_copy(update={"nats_user": sender})
    return event.model_copy(update={"requested_by": requester})


class SubjectMismatch(ValueError):
    """An event whose body names another subject than the one it came on."""


def as_sent(event: E, subject: str) -> E:
    """`event` as its subject vouches for it. The server checks who may publish on a subject,
    never what the body says: the validator may publish no outcome but `.blocked` and
    `.failed`, yet a body on `.failed` can say `DeploymentPromoted`, for any model or
    deployment. An event counts
    only where its type, model and deployment give the subject it came on (a command's sender
    is taken from the subject first, `with_sender`). An empty subject (a test broker that does
    not pass one) is not checked."""
    event = with_sender(event, subject)
    if subject and isinstance(event, Event):
        expected = subject_for(event)
        if expected != subject:
            raise SubjectMismatch(
                f"a {type(event).__name__} for {event.model} {event.deployment_id} belongs on "
                f"{expected}, not on {subject}: the body does not match the subject it was "
                "published on (only the subject is checked by the server)"
            )
    return event


def _parse(data: bytes, subject: str) -> DeploymentEvent | None:
    try:
        return as_sent(DEPLOYMENT_EVENT.validate_json(data, strict=True), subject)
    except ValueError:
        return None  # SubjectMismatch included: a forged event is not history


DIRECT_BATCH = 256
FOLLOW_POLL_S = 0.2


async def first_request(js: JetStreamContext, deployment_id: str) -> DeploymentRequested | None:
    """The first request stored under a deployment id, whatever its model (direct get), or None.
    Ids are anyone's to pick and each publisher may choose its own message id, so a later
    request under a taken id is not deduplicated: the first one is the deployment."""
    found, _ = await direct_get(
        js._nc, subjects.EVENTS_STREAM, subjects.request_of(deployment_id), 1, 16
    )
    for _, subject, payload in found:
        parsed = _parse(payload, subject)
        if isinstance(parsed, DeploymentRequested):
            return parsed
    return None


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more at the end."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, want in enumerate(wanted):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == len(wanted)


async def direct_get(
    nc: NATS, stream: str, filter_subject: str, start_seq: int, batch: int = DIRECT_BATCH
) -> tuple[list[tuple[int, str, bytes]], int]:
    """(sequence, subject, payload) of up to `batch` messages matching a filter from
    `start_seq` on, and how many more match after them: one batched direct get
    (`$JS.API.DIRECT.GET`), which needs no consumer, so readers need no right to create one."""
    found: list[tuple[int, str, bytes]] = []
    request = {"seq": start_seq, "next_by_subj": filter_subject, "batch": batch}
    answers = _answers(
        nc, f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), f"a read of {stream}"
    )
    async with contextlib.aclosing(answers):
        async for msg in answers:
            headers = msg.headers or {}
            status = headers.get("Status")
            # Not this read's answers: a message outside the filter from a direct get someone
            # else asked to be answered here (consumer deliveries aimed here, with their ack
            # subject, _answers leaves out). The server's own answers carry its Nats-Subject
            # (review 13: a forged PROMOTED pushed into `deploy --wait`'s reads).
            if status is None and not subject_matches(
                headers.get("Nats-Subject", ""), filter_subject
            ):
                continue
            if status == "404":
                return found, 0
            if status is not None:  # 204 end of batch; 408 or other: what we have is all
                pending = int(headers.get("Nats-Num-Pending", 0) or 0)
                if status != "204":
                    raise BusUnavailable(
                        f"direct get on {stream} answered {status} {headers.get('Description')}"
                    )
                return found, pending
            found.append((int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data))
    raise AssertionError("unreachable: _answers ends only by raising")


async def follow(
    js: JetStreamContext,
    filter_subject: str,
    *,
    stop_when_caught_up: bool = False,
    poll_s: float = FOLLOW_POLL_S,
) -> AsyncIterator[DeploymentEvent]:
    """Events matching a filter from the start of the stream, then live ones as they come
    (polled by direct get every `poll_s` once caught up).

    Messages that do not parse are skipped here (readers are not the place to dead-letter them;
    the consuming service already did).
    """
    nc: NATS = js._nc
    seq = 1
    while True:
        batch, pending = await direct_get(nc, subjects.EVENTS_STREAM, filter_subject, seq)
        for number, subject, data in batch:
            seq = number + 1
            event = _parse(data, subject)
            if event is not None:
                yield event
        if pending == 0:
            if stop_when_caught_up:
                return
            await aio.sleep(poll_s)
