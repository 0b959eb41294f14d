"""A direct-get read takes only the server's answers to it: its inbox can be aimed at by others
(review 13: a PROMOTED with forged headers, pushed there by a consumer, ended `deploy --wait`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.runtime import bus


@dataclass
class Msg:
    data: bytes
    headers: dict[str, str] | None
    reply: str = ""


@dataclass
class Inbox:
    queued: list[Msg]

    async def next_msg(self, timeout: float) -> Msg:
        return self.queued.pop(0)

    async def unsubscribe(self) -> None:
        return None


@dataclass
class Connection:
    """What direct_get uses of a nats-py client: an inbox, a subscription, a publish."""

    queued: list[Msg]
    sent: list[str] = field(default_factory=list)

    def new_inbox(self) -> str:
        return "_INBOX.read"

    async def subscribe(self, subject: str) -> Inbox:
        return Inbox(self.queued)

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.sent.append(subject)


def answer(seq: int, subject: str) -> Msg:
    return Msg(b"{}", {"Nats-Sequence": str(seq), "Nats-Subject": subject, "Nats-Stream": "E"})


async def test_deliveries_and_answers_outside_the_filter_are_not_read() -> None:
    wanted = "preflight.*.m.d-1.>"
    forged = {"Nats-Sequence": "999", "Nats-Subject": "preflight.outcome.m.d-1.promoted"}
    queued = [
        Msg(b"PROMOTED", forged, reply="$JS.ACK.E.evil.1.5.1.0.0"),  # a consumer's delivery
        Msg(b"", {"Status": "204"}, reply="$JS.ACK.E.evil.1.6.2.0.0"),  # a forged end of batch
        answer(3, "preflight.stage.other.d-9.requested"),  # someone else's direct get
        answer(1, "preflight.stage.m.d-1.requested"),
        Msg(b"", {"Status": "204", "Nats-Num-Pending": "0"}),
    ]
    nc: Any = Connection(queued)
    found, pending = await bus.direct_get(nc, "E", wanted, 1)
    assert found == [(1, "preflight.stage.m.d-1.requested", b"{}")]
    assert pending == 0 and nc.sent == ["$JS.API.DIRECT.GET.E"]


def test_subjects_match_as_nats_matches_them() -> None:
    assert bus.subject_matches("preflight.outcome.m.d.promoted", "preflight.*.m.d.>")
    assert not bus.subject_matches("preflight.outcome.m.e.promoted", "preflight.*.m.d.>")
    assert not bus.subject_matches("a.b", "a.b.>") and bus.subject_matches("a.b.c", "a.b.>")
    assert bus.subject_matches("a", "a") and not bus.subject_matches("a.b", "a")
