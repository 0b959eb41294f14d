"""What the CLI prints of a request is safe for a terminal: the fields come from anyone who may
publish one."""

from __future__ import annotations

import io

from rich.console import Console

from services.contracts.events import AbortDeployment, DeploymentRequested, Requester
from services.stack import render


def printed(markup: str) -> str:
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system=None, width=400).print(
        markup, highlight=False
    )
    return out.getvalue()


def test_control_characters_and_markup_from_a_request_are_shown_not_obeyed() -> None:
    hostile = "mallory\x1b[2J\x1b[1;1H\rci-bot \u202eedoc[link=http://evil/]x[/link]"
    request = DeploymentRequested(
        deployment_id="d-1",
        model="m",
        version="1",
        location="/models/m\x1b]0;pwned\x07",
        requested_by=Requester(user=hostile, system="cli\x00"),
    )
    line = printed(render.describe(request))
    assert "\x1b" not in line and "\r" not in line.rstrip("\n")
    assert "\\x1b[2J" in line and "\\u202e" in line and "\\x07" in line and "\\x00" in line
    assert "[link=http://evil/]x[/link]" in line  # markup shown as text, not a link
    abort = AbortDeployment(
        deployment_id="d-1", model="m", version="1", requested_by=Requester(user="a\rb")
    )
    assert "a\\rb" in printed(render.describe(abort))
    assert render.shown("plain text, ünïcode") == "plain text, ünïcode"
