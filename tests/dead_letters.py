"""Reading the dead-letter stream back in tests."""

from __future__ import annotations

from nats.js import JetStreamContext

from services.contracts import subjects
from services.contracts.events import DeadLetter


async def sized_dead_letters(js: JetStreamContext) -> list[tuple[int, DeadLetter]]:
    """(size on the wire, letter) of every dead letter, oldest first."""
    info = await js.stream_info(subjects.DEADLETTER_STREAM)
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(subjects.DEADLETTER_STREAM, seq)
        letters.append((len(msg.data or b""), DeadLetter.model_validate_json(msg.data or b"")))
    return letters


async def dead_letters(js: JetStreamContext) -> list[DeadLetter]:
    return [letter for _, letter in await sized_dead_letters(js)]
