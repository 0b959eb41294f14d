"""Follow preflight's deployment outcomes from any system: plain nats-py plus the JSON Schemas.

Nothing from the preflight package is imported: a subscriber needs only the NATS URL, the subject
layout (docs/subscribing.md) and the schemas in schemas/ (one JSON Schema per message type).

    python examples/subscribe_outcomes.py --server nats://127.0.0.1:4222
    python examples/subscribe_outcomes.py --model org/chat-7b.v2 --from-start
    python examples/subscribe_outcomes.py --durable my-system     # resumes where it stopped
    NATS_PASSWORD=... python examples/subscribe_outcomes.py --user subscriber  # shipped nats.conf

Prints one line per outcome; a message that does not match its schema is reported on stderr
and skipped (acknowledged, so it is not redelivered forever).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import jsonschema
import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError

STREAM = "PREFLIGHT_EVENTS"
OUTCOMES = "preflight.outcome.>"
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
INACTIVE_S = 300.0  # an ephemeral consumer nobody pulled from for this long is deleted


def model_subject(model: str) -> str:
    """Every outcome of one model: subject tokens cannot hold `.`, so it travels as `%2E`."""
    return f"preflight.outcome.{model.replace('.', '%2E')}.>"


def load_validators(directory: Path) -> dict[str, jsonschema.protocols.Validator]:
    """One validator per message type, keyed by the schema's `type` constant."""
    validators: dict[str, jsonschema.protocols.Validator] = {}
    for path in sorted(directory.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        kind = schema.get("properties", {}).get("type", {}).get("const")
        if kind:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            validators[kind] = cls(schema)
    if not validators:
        raise SystemExit(f"no JSON Schemas found in {directory}")
    return validators


def parse(msg: Msg, validators: dict[str, jsonschema.protocols.Validator]) -> dict[str, Any]:
    """The outcome as a dict, or ValueError saying why it cannot be trusted."""
    try:
        data = json.loads(msg.data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = data.get("type")
    validator = validators.get(kind) if isinstance(kind, str) else None
    if validator is None:
        raise ValueError(f"unknown message type {kind!r} (newer schemas?)")
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise ValueError(f"{kind} does not match its schema at {where}: {error.message}")
    return data


def describe(outcome: dict[str, Any]) -> str:
    """One line: when, what, which model and version, which deployment, who, why, where."""
    kind = outcome["type"].removeprefix("Deployment").lower()
    who = outcome.get("requested_by", {}).get("user", "unknown")
    reasons = outcome.get("reasons") or []
    line = (
        f"{outcome['occurred_at']} {kind:<10} {outcome['model']} {outcome['version']} "
        f"{outcome['deployment_id']} by {who}"
    )
    if reasons:
        line += f": {reasons[0]}"
    if outcome.get("metrics_url"):
        line += f" [{outcome['metrics_url']}]"
    return line


async def follow(args: argparse.Namespace) -> int:
    validators = load_validators(args.schemas)
    subject = model_subject(args.model) if args.model else OUTCOMES
    auth: dict[str, Any] = {}
    if args.user:
        # With the shipped nats.conf a user receives replies (pulled messages too) only on its
        # own inbox prefix, `_INBOX_<user>.>`.
        auth = {
            "user": args.user,
            "password": os.environ.get("NATS_PASSWORD", ""),
            "inbox_prefix": f"_INBOX_{args.user}",
        }
    nc = await nats.connect(args.server, name="outcome-subscriber", **auth)
    js = nc.jetstream()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seen = 0

    def take(msg: Msg) -> bool:
        """Print one message; True when it was a valid outcome."""
        try:
            outcome = parse(msg, validators)
        except ValueError as exc:
            print(f"skipped {msg.subject}: {exc}", file=sys.stderr, flush=True)
            return False
        print(describe(outcome), flush=True)
        return True

    ephemeral = ""
    try:
        if args.durable:
            # A durable pull consumer: the server remembers what was acknowledged, so a restart
            # resumes where the last run stopped. Several processes may share it (a work queue).
            pull = await js.pull_subscribe(
                subject,
                durable=args.durable,
                stream=STREAM,
                config=ConsumerConfig(ack_wait=30, max_deliver=5),
            )
            print(f"subscribed to {subject} (durable {args.durable})", file=sys.stderr, flush=True)
            while not stop.is_set():
                try:
                    batch = await pull.fetch(10, timeout=1.0)
                except (TimeoutError, FetchTimeoutError):
                    continue
                for msg in batch:
                    seen += take(msg)
                    await msg.ack()
                    if args.count and seen >= args.count:
                        stop.set()
                        break
        else:
            # An ephemeral pull consumer of our own: a random name, no acks, in order; starts
            # at new messages, or at the beginning of the stream's history with --from-start.
            # The server deletes it INACTIVE_S after the last pull, so a killed process leaves
            # nothing behind. It is named (the create subject carries the name): the shipped
            # nats.conf refuses the unnamed create that nats-py's ordered consumers use, since
            # on that subject a body could name, and rewrite, a service's durable.
            ephemeral = f"outcomes-{secrets.token_hex(6)}"
            await js.add_consumer(
                STREAM,
                ConsumerConfig(
                    name=ephemeral,
                    filter_subject=subject,
                    deliver_policy=DeliverPolicy.ALL if args.from_start else DeliverPolicy.NEW,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=INACTIVE_S,
                    mem_storage=True,
                ),
            )
            pull = await js.pull_subscribe_bind(ephemeral, stream=STREAM)
            print(f"subscribed to {subject}", file=sys.stderr, flush=True)
            while not stop.is_set():
                try:
                    batch = await pull.fetch(10, timeout=1.0)
                except (TimeoutError, FetchTimeoutError):
                    continue
                for msg in batch:
                    seen += take(msg)
                    if args.count and seen >= args.count:
                        stop.set()
                        break
    finally:
        if ephemeral:
            with contextlib.suppress(Exception):
                await js.delete_consumer(STREAM, ephemeral)
        with contextlib.suppress(Exception):
            await nc.flush()  # the last acks reach the server before the connection closes
        await nc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", default="nats://127.0.0.1:4222", help="NATS URL")
    parser.add_argument(
        "--user", help="NATS user, e.g. subscriber (the password is read from NATS_PASSWORD)"
    )
    parser.add_argument("--model", help="only this model's outcomes, e.g. org/chat-7b.v2")
    parser.add_argument("--durable", help="durable consumer name (resume after a restart)")
    parser.add_argument(
        "--from-start", action="store_true", help="without --durable: replay the history too"
    )
    parser.add_argument("--count", type=int, default=0, help="exit after N outcomes (0: never)")
    parser.add_argument("--schemas", type=Path, default=SCHEMAS, help="schemas/ directory")
    return asyncio.run(follow(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
