"""What an attacker with a consumer of their own does with a service's inbox: has JetStream
deliver stored messages there (nats-server does not check a consumer's deliver subject against
its creator's rights, nats-io/nats-server#8274)."""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext

from services.contracts import subjects


async def aim_push_consumers(
    js: JetStreamContext, inboxes: Iterable[str], filter_subject: str, prefix: str
) -> None:
    """One push consumer of the events stream per inbox, delivering `filter_subject`'s stored
    messages there (a wildcard inbox gets a subject under it)."""
    for i, inbox in enumerate(inboxes):
        await js.add_consumer(
            subjects.EVENTS_STREAM,
            name=f"{prefix}-{i}",
            deliver_subject=inbox.replace("*", "x"),
            filter_subject=filter_subject,
            ack_policy="none",
        )
