"""What every service app shares: the broker, durable consumers, dead letters, event publishing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import nats.js.client
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats import errors as nats_errors
from pydantic import BaseModel, TypeAdapter, ValidationError

from services.contracts import subjects
from services.contracts.events import Command, DeadLetter, DeploymentFailed, Event, Outcome
from services.contracts.policy import PolicyFile, load_policy_file
from services.contracts.routing import subject_for
from services.runtime import bus, faults
from services.runtime.settings import Settings

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("preflight")


class EventSink(Protocol):
    """Where a handler's resulting events go (the bus in services, a list in unit tests)."""

    async def publish_event(self, event: Event) -> None: ...


@dataclass
class BrokerSink:
    """Publishes events to the events stream through the service's FastStream broker."""

    broker: NatsBroker

    async def publish_event(self, event: Event) -> None:
        async def publish(headers: dict[str, str]) -> Any:
            return await self.broker.publish(
                bus.encode(event),
                subject_for(event),
                headers=headers,
                stream=subjects.EVENTS_STREAM,
            )

        connection = getattr(self.broker, "_connection", None)
        if connection is None:  # a test broker: no server to read a duplicate back from
            await publish(bus.headers_for(event))
            return
        await bus.publish_checked(connection.jetstream(), event, publish, bus.headers_for(event))


# A dead letter must fit in one NATS message: the server's max_payload (1 MiB by default) less
# room for headers. The payload is kept whole up to this size, cut to fit beyond it.
MAX_DEAD_LETTER_PAYLOAD = 256 * 1024
DEFAULT_MAX_PAYLOAD = 1024 * 1024
HEADER_ROOM = 4096


class Rejected(Exception):
    """Raised by a handler for a message that is well-formed but must not be acted on (a command
    from a user not allowed to send it): dead-lettered with this reason at once, never retried."""


def make_dead_letter(
    *,
    service: str,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    reason: str,
    attempt: int | None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
    stream: str | None = None,
    stream_sequence: int | None = None,
) -> DeadLetter:
    """The dead letter of a message, always small enough to publish: `max_bytes` is the
    server's max_payload. A payload that does not fit is cut (the letter says so, with the
    sha256 of the whole and where the original is kept: its stream and sequence)."""
    kept_headers = {k[:256]: str(v)[:1024] for k, v in list((headers or {}).items())[:32]}
    budget = max(1024, min(MAX_DEAD_LETTER_PAYLOAD, max_bytes - HEADER_ROOM))
    cut = min(len(payload), budget)
    while True:
        letter = _dead_letter(
            service, subject, payload, cut, kept_headers, reason, attempt, stream, stream_sequence
        )
        size = len(letter.model_dump_json())
        if size <= max_bytes - HEADER_ROOM or cut == 0:
            return letter
        cut = min(cut // 2, max(0, cut - (size - (max_bytes - HEADER_ROOM))))


def _dead_letter(
    service: str,
    subject: str,
    payload: bytes,
    cut: int,
    headers: dict[str, str],
    reason: str,
    attempt: int | None,
    stream: str | None,
    stream_sequence: int | None,
) -> DeadLetter:
    kept = payload[:cut]
    truncated = cut < len(payload)
    if truncated:
        digest = hashlib.sha256(payload).hexdigest()
        where = f"; the whole is {stream} sequence {stream_sequence}" if stream_sequence else ""
        reason = (
            f"{reason[:3000]} [payload of {len(payload)} bytes truncated to {cut}; "
            f"sha256 of the whole: {digest}{where}]"
        )
    try:
        text: str | None = kept.decode("utf-8")
        b64 = None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(kept).decode()
    return DeadLetter(
        service=service,
        subject=subject[:1024],
        reason=reason[:4000],
        payload_text=text,
        payload_b64=b64,
        headers=headers,
        delivery_attempt=attempt,
        stream=stream,
        stream_sequence=stream_sequence,
        truncated=truncated,
    )


def stream_position(raw: Any) -> tuple[str | None, int | None]:
    """(stream, stream sequence) of a JetStream message; (None, None) for core NATS."""
    try:
        meta = raw.metadata
        return str(meta.stream), int(meta.sequence.stream)
    except (AttributeError, TypeError, ValueError, nats_errors.NotJSMessageError):
        return None, None


def delivered_by(raw: Any) -> tuple[str, str] | None:
    """(stream, consumer) whose delivery this is, from the ack subject JetStream replies on;
    None for a message that no consumer delivered (core NATS, in-memory tests)."""
    try:
        meta = raw.metadata
        return str(meta.stream), str(meta.consumer)
    except (AttributeError, TypeError, ValueError, IndexError, nats_errors.NotJSMessageError):
        return None


def delivery_attempt(raw: Any) -> int | None:
    """Which delivery of a JetStream message this is; None for core NATS (and in-memory tests)."""
    try:
        return int(raw.metadata.num_delivered)
    except (AttributeError, TypeError, ValueError, nats_errors.NotJSMessageError):
        return None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return f"{exc.title} does not validate: " + "; ".join(parts)


def default_retry_delay(attempt: int) -> float:
    """Seconds before the redelivery of a message whose handler failed on `attempt`."""
    wait: float = 0.5 * 2.0 ** (attempt - 1)
    return min(30.0, wait)


@dataclass
class ServiceApp:
    """A FastStream app plus what the runner and tests need to know about it."""

    name: str
    settings: Settings
    broker: NatsBroker
    app: FastStream
    sink: EventSink
    policy_file: PolicyFile
    listening: dict[str, str] = field(default_factory=dict)
    durables: list[str] = field(default_factory=list)
    # Handle only what this service's own durable delivered. A pull consumer's messages arrive
    # on the service's inbox, and that inbox is not private: another user may create a push
    # consumer that delivers there (nats-server does not check a deliver subject against the
    # creator's rights, nats-io/nats-server#8274), pull from its own consumer with the
    # service's inbox as the reply subject, or make JetStream answer a direct get there. The
    # inboxes are listed by the monitoring port's /connz?subs=detail. Every such message is a
    # stored one replayed: a refused promote, fired again at a held canary, promoted it. Off
    # only for FastStream's in-memory broker, whose messages carry no JetStream metadata.
    require_own_delivery: bool = True
    _foreign: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _foreign_logged: float = field(default=-math.inf, init=False, repr=False)

    def max_payload(self) -> int:
        connection = getattr(self.broker, "_connection", None)
        value = getattr(connection, "max_payload", None)
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_PAYLOAD

    async def dead_letter(self, letter: DeadLetter) -> None:
        await self.broker.publish(
            letter.model_dump_json().encode(),
            subjects.deadletter(letter.service),
            headers=dict(bus.CONTENT_TYPE),
            stream=subjects.DEADLETTER_STREAM,
        )

    def consume(
        self,
        durable: str,
        model: type[M] | TypeAdapter[M],
        *,
        one_at_a_time: bool = False,
        retry_delay: Callable[[int], float] | None = None,
    ) -> Callable[[Callable[[M], Awaitable[None]]], Callable[[M], Awaitable[None]]]:
        """Register `fn` on a durable pull consumer; bad payloads and repeated failures dead-letter.

        `one_at_a_time`: pull and handle a single message per instance (heavy work such as
        benchmarks: other instances take the rest, and measurements do not share the machine).

        The handler's own exceptions are retried with backoff (nak with delay) until the
        consumer's `max_deliver`; the last attempt goes to the dead-letter stream instead of
        vanishing. `retry_delay(attempt)`: the wait before the next delivery after a failed
        attempt (1-based); default 0.5 s doubling up to 30 s.
        """
        stream, filters = bus.consumer_filters(durable)
        config = bus.consumer_config(durable, filters, self.settings)
        self.durables.append(durable)

        # Strict, as schemas/ is: lax pydantic reads an integer as a datetime, a string as a
        # number; what the published schema rejects must be dead-lettered, not acted on.
        def parse(data: bytes) -> M:
            if isinstance(model, TypeAdapter):
                parsed: M = model.validate_json(data, strict=True)
                return parsed
            return model.model_validate_json(data, strict=True)

        def register(fn: Callable[[M], Awaitable[None]]) -> Callable[[M], Awaitable[None]]:
            @self.broker.subscriber(
                filters[0],
                stream=JStream(stream, declare=False),
                durable=durable,
                config=config,
                pull_sub=PullSub(batch_size=1 if one_at_a_time else 10, timeout=1.0),
                ack_policy=AckPolicy.MANUAL,
                # The body stays bytes: FastStream's own decoder json.loads a body sent as
                # application/json and raises on one that is not, before `_handle` can
                # dead-letter it (the message was redelivered, then dropped).
                decoder=_raw_body,
                # Pulled messages arrive on this user's own inbox prefix (nats.conf).
                inbox_prefix=f"{bus.inbox_prefix(self.settings.nats_user)}.".encode(),
                title=f"{self.name}:{durable}",
            )
            async def handler(msg: NatsMessage) -> None:
                if self.require_own_delivery and not self._own_delivery(msg, stream, durable):
                    return
                await self._handle(msg, parse, fn, retry_delay or default_retry_delay)

            return fn

        return register

    def _own_delivery(self, msg: Any, stream: str, durable: str) -> bool:
        """Whether `durable` delivered `msg`; any other message is dropped unread and unacked
        (it is not this consumer's to ack), and counted in a warning at most once a minute."""
        source = delivered_by(msg.raw_message)
        if source == (stream, durable):
            return True
        who = f"{source[0]} consumer {source[1]}" if source else "no consumer (a plain message)"
        self._foreign[who] = self._foreign.get(who, 0) + 1
        now = time.monotonic()
        if now - self._foreign_logged >= 60.0:
            self._foreign_logged = now
            counts = ", ".join(f"{n} from {w}" for w, n in sorted(self._foreign.items()))
            log.warning(
                "%s: dropped messages on %s's inbox that %s did not deliver (%s so far): "
                "someone aims another consumer, or a reply, at this service's inbox",
                self.name,
                durable,
                durable,
                counts,
            )
        return False

    async def _handle(
        self,
        msg: Any,
        parse: Callable[[bytes], M],
        fn: Callable[[M], Awaitable[None]],
        retry_delay: Callable[[int], float] | None = None,
    ) -> None:
        raw = msg.raw_message
        attempt = delivery_attempt(raw)
        subject = str(getattr(raw, "subject", "") or msg.path.get("subject", ""))
        headers = dict(msg.headers or {})
        body: bytes = msg.body
        position = stream_position(raw)
        try:
            event = bus.as_sent(parse(body), subject)
        except ValidationError as exc:
            reason = describe_validation_error(exc)
            await self._reject(subject, body, headers, reason, attempt, position)
            await msg.ack()
            return
        except bus.SubjectMismatch as exc:
            log.warning("%s: %s", self.name, exc)
            await self._reject(subject, body, headers, str(exc), attempt, position)
            await msg.ack()
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg)) if attempt is not None else None
        try:
            await fn(event)
        except Rejected as exc:
            await self._reject(subject, body, headers, str(exc), attempt, position)
            await msg.ack()
            return
        except nats_errors.MaxPayloadError as exc:
            # What the handler made of this message is too big for one message (a request that
            # fits, with a stage report added, may not): every retry would do the same work and
            # fail the same way, so the deployment fails now, saying why.
            reason = (
                f"an event made from this {len(body):,}-byte message is over the server's "
                f"max_payload of {self.max_payload():,} bytes ({exc}); a request this large "
                "cannot go through the pipeline"
            )
            log.error("%s: %s: %s", self.name, subject, reason)
            await self._reject(subject, body, headers, reason, attempt, position)
            await self._fail_deployment(event, reason)
            await msg.ack()
            return
        except BaseException as exc:  # a Rust panic in model code is a BaseException (faults.py)
            if not faults.is_contained(exc):
                raise
            if attempt is not None and attempt >= self.settings.max_deliver:
                log.exception("%s: giving up on %s after %d attempts", self.name, subject, attempt)
                reason = f"handler failed on attempt {attempt}: {type(exc).__name__}: {exc}"
                await self._reject(subject, body, headers, reason, attempt, position)
                await self._fail_deployment(event, reason)
                await msg.ack()
                return
            log.exception(
                "%s: handler failed on %s (attempt %s); will retry", self.name, subject, attempt
            )
            await msg.nack(delay=(retry_delay or default_retry_delay)(attempt or 1))
            return
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        await msg.ack()

    async def _fail_deployment(self, event: Any, reason: str) -> None:
        """A deployment whose step can never be handled ends as `DeploymentFailed`, so nobody
        waits on it forever (commands and metrics are not deployments: nothing to fail)."""
        if not isinstance(event, Event) or isinstance(event, Command | Outcome):
            return
        failed = DeploymentFailed(
            deployment_id=event.deployment_id,
            model=event.model,
            version=event.version,
            stage=self.name,
            error=reason[:2000],
            reasons=(f"{self.name} could not handle it: {reason[:500]}",),
        )
        try:
            await self.sink.publish_event(failed)
        except Exception:
            log.exception("%s: could not publish DeploymentFailed", self.name)

    async def _keep_alive(self, msg: Any) -> None:
        """Long work (hashing, benchmarks) tells JetStream it is still in progress, so the
        message is not redelivered to another instance; a killed worker stops doing this and
        its message is redelivered after `ack_wait`."""
        interval = max(self.settings.ack_wait_s / 3, 0.5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_handler_s
        while loop.time() < deadline:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:  # the connection may be gone; the ack at the end will tell
                log.debug("%s: in-progress ack failed", self.name, exc_info=True)
        log.error(
            "%s: handler still running after %.0f s; no more in-progress acks, so JetStream "
            "will redeliver the message",
            self.name,
            self.settings.max_handler_s,
        )

    async def _reject(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        reason: str,
        attempt: int | None,
        position: tuple[str | None, int | None] = (None, None),
    ) -> None:
        log.warning("%s: dead-lettering message on %s: %s", self.name, subject, reason[:500])
        letter = make_dead_letter(
            service=self.name,
            subject=subject,
            payload=body,
            headers=headers,
            reason=reason,
            attempt=attempt,
            max_bytes=self.max_payload(),
            stream=position[0],
            stream_sequence=position[1],
        )
        try:
            await self.dead_letter(letter)
        except Exception:
            # Not even the dead-letter stream took it: say so loudly; the caller's ack still
            # ends redelivery of a message that can never be handled.
            log.exception("%s: could not dead-letter the message on %s", self.name, subject)


async def _raw_body(msg: Any) -> Any:
    """FastStream decoder that leaves the body undecoded; `_handle` parses it strictly."""
    return msg.body


def _fetch_times_out_as_nats_does() -> None:
    """nats-py (2.15 and 2.16 alike) ends an empty batch fetch with asyncio's TimeoutError, where
    FastStream 0.7.8's pull loop suppresses only nats' own `nats.errors.TimeoutError`; so every
    idle pull consumer logged an ERROR traceback and FastStream restarted its task. nats' error
    is a subclass of asyncio's, so raising it instead keeps every other caller's `except` true.
    """
    pull = nats.js.client.JetStreamContext.PullSubscription
    if getattr(pull.fetch, "_preflight", False):
        return
    original = pull.fetch

    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats_errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats_errors.TimeoutError from exc

    fetch._preflight = True  # type: ignore[attr-defined]
    pull.fetch = fetch  # type: ignore[method-assign]


def build_service(
    name: str, settings: Settings, *, policy_file: PolicyFile | None = None
) -> ServiceApp:
    """The broker and app of one service; its module adds handlers with `consume`."""
    _fetch_times_out_as_nats_does()
    logger = logging.getLogger(f"preflight.{name}")
    options = bus.connect_options(settings)
    security = None
    if "user" in options:  # FastStream takes credentials as a security object, not kwargs
        from faststream.security import SASLPlaintext

        security = SASLPlaintext(username=options["user"], password=options["password"])
    broker = NatsBroker(
        [s.strip() for s in settings.nats_url.split(",")],
        inbox_prefix=options["inbox_prefix"],
        security=security,
        name=f"preflight-{name}-{settings.instance}",
        logger=logger,
        log_level=logging.DEBUG,  # per-message logs at DEBUG: they halve throughput at INFO
        max_reconnect_attempts=-1,
        graceful_timeout=30.0,
    )
    service = ServiceApp(
        name=name,
        settings=settings,
        broker=broker,
        app=FastStream(broker, logger=logger),
        sink=BrokerSink(broker),
        policy_file=policy_file or load_policy_file(settings.policy_file),
    )

    async def topology() -> None:
        """Bind, never create: the admin's `preflight bootstrap` made the durables."""
        if not service.durables:
            return
        nc = await bus.connect(settings, f"preflight-{name}-topology")
        try:
            await bus.require_consumers(nc.jetstream(), service.durables)
        finally:
            await nc.close()

    service.app.on_startup(topology)
    heartbeat_task: list[asyncio.Task[None]] = []

    async def start_heartbeat() -> None:
        heartbeat_task.append(asyncio.create_task(_heartbeat(service), name="heartbeat"))

    async def stop_heartbeat() -> None:
        for task in heartbeat_task:
            task.cancel()
        health_file(settings, name).unlink(missing_ok=True)

    service.app.after_startup(start_heartbeat)
    service.app.on_shutdown(stop_heartbeat)
    return service


HEARTBEAT_S = 5.0
HEALTHY_WITHIN_S = 30.0


def health_file(settings: Settings, name: str) -> Path:
    """Where a running service writes its heartbeat (one per service per data dir/container)."""
    return settings.data_dir / "health" / f"{name}.json"


async def _heartbeat(service: ServiceApp) -> None:
    """Every few seconds: the time and whether the bus connection is up, for health checks."""
    path = health_file(service.settings, service.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        connection = getattr(service.broker, "_connection", None)
        connected = bool(connection is not None and getattr(connection, "is_connected", False))
        record = {"pid": os.getpid(), "ts": time.time(), "connected": connected}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        await asyncio.sleep(HEARTBEAT_S)


def check_health(settings: Settings, name: str, now: float | None = None) -> tuple[bool, str]:
    """(healthy, why) from the service's heartbeat file: fresh and connected to the bus."""
    path = health_file(settings, name)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"{name}: no heartbeat at {path} (not started, or stopped)"
    except (OSError, ValueError) as exc:
        return False, f"{name}: heartbeat unreadable: {exc}"
    age = (now if now is not None else time.time()) - float(record.get("ts", 0))
    if age > HEALTHY_WITHIN_S:
        return False, f"{name}: last heartbeat {age:.0f} s ago (hung or stopped)"
    if not record.get("connected"):
        return False, f"{name}: not connected to NATS"
    return True, f"{name}: healthy (heartbeat {age:.0f} s ago, pid {record.get('pid')})"
