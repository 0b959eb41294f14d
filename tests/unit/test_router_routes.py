"""The router's pure parts: weighted and sticky choice, the record's deployment id, the table."""

from __future__ import annotations

import math
import random

import pytest

from services.contracts.events import Route, RouteTarget
from services.router.proxy import forwardable
from services.router.routes import (
    Change,
    NoModel,
    RouteTable,
    UnknownModel,
    pick_role,
    record_deployment_id,
    resolve_model,
    select,
    sticky_point,
)

MODEL = "org/chat-7b.v2"


def route(
    weight: float,
    *,
    stable: bool = True,
    canary: bool = True,
    canary_id: str | None = "d-canary",
    model: str = MODEL,
) -> Route:
    return Route(
        model=model,
        stable=RouteTarget(deployment_id="d-stable", version="1", upstream="http://s:1")
        if stable
        else None,
        canary=RouteTarget(deployment_id=canary_id, version="2", upstream="http://c:2")
        if canary
        else None,
        canary_weight=weight,
    )


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(hits - n * p) <= sigmas * sd


@pytest.mark.parametrize("weight", [5.0, 50.0, 0.5])
def test_random_split_proportions_are_within_binomial_bounds(weight: float) -> None:
    rng = random.Random(7)
    n = 20_000
    hits = sum(pick_role(route(weight), draw=rng.random() * 100) == "canary" for _ in range(n))
    assert within_binomial(hits, n, weight / 100), hits


@pytest.mark.parametrize("weight", [5.0, 50.0])
def test_sticky_split_proportions_are_within_binomial_bounds(weight: float) -> None:
    n = 20_000
    hits = sum(
        pick_role(route(weight), draw=0.0, client=f"client-{i}") == "canary" for i in range(n)
    )
    assert within_binomial(hits, n, weight / 100), hits


def test_a_sticky_client_always_gets_the_same_role_whatever_the_draw() -> None:
    rng = random.Random(1)
    for i in range(200):
        roles = {pick_role(route(50.0), draw=rng.random() * 100, client=f"c{i}") for _ in range(10)}
        assert len(roles) == 1


def test_raising_the_weight_only_moves_sticky_clients_from_stable_to_canary() -> None:
    clients = [f"user-{i}" for i in range(2000)]
    previous: set[str] = set()
    for weight in (1.0, 5.0, 12.5, 25.0, 50.0, 99.0):
        now = {c for c in clients if pick_role(route(weight), draw=0, client=c) == "canary"}
        assert previous <= now
        previous = now


def test_each_rollout_picks_its_own_early_clients() -> None:
    clients = [f"user-{i}" for i in range(2000)]
    first = {c for c in clients if pick_role(route(10.0), draw=0, client=c) == "canary"}
    second_route = route(10.0, canary_id="d-canary-next")
    second = {c for c in clients if pick_role(second_route, draw=0, client=c) == "canary"}
    assert first != second


def test_sticky_point_is_stable_and_in_range() -> None:
    points = [sticky_point(f"c{i}", "d-1") for i in range(1000)]
    assert all(0 <= p < 100 for p in points)
    assert points == [sticky_point(f"c{i}", "d-1") for i in range(1000)]


@pytest.mark.parametrize(
    ("case", "r", "draw", "expected"),
    [
        ("weight 0: stable", route(0.0), 0.0, "stable"),
        ("weight 100: canary", route(100.0), 99.999, "canary"),
        ("draw below weight: canary", route(5.0), 4.99, "canary"),
        ("draw at weight: stable", route(5.0), 5.0, "stable"),
        ("fractional weight", route(0.25), 0.2, "canary"),
        ("no canary target: stable", route(50.0, canary=False), 0.0, "stable"),
        ("no stable target: canary takes all", route(5.0, stable=False), 99.0, "canary"),
    ],
)
def test_pick_role_cases(case: str, r: Route, draw: float, expected: str) -> None:
    assert pick_role(r, draw=draw) == expected, case


@pytest.mark.parametrize(
    ("case", "r", "expected"),
    [
        ("canary live: the canary's id", route(5.0), "d-canary"),
        ("weight 0: the stable's id", route(0.0), "d-stable"),
        ("no canary: the stable's id", route(30.0, canary=False), "d-stable"),
        ("nothing: empty", route(0.0, stable=False, canary=False), ""),
        ("canary without an id", route(5.0, canary_id=None), ""),
    ],
)
def test_record_deployment_id_cases(case: str, r: Route, expected: str) -> None:
    assert record_deployment_id(r) == expected, case


def test_both_roles_carry_the_canary_id_while_it_is_live() -> None:
    stable = select(route(50.0), draw=99.0)
    canary = select(route(50.0), draw=1.0)
    assert (stable.role, stable.version, stable.upstream) == ("stable", "1", "http://s:1")
    assert (canary.role, canary.version, canary.upstream) == ("canary", "2", "http://c:2")
    assert stable.deployment_id == canary.deployment_id == "d-canary"


@pytest.mark.parametrize(
    ("case", "r", "pin", "role", "pinned"),
    [
        ("canary pin at weight 0", route(0.0), "canary", "canary", True),
        ("canary pin, any case", route(0.0), " Canary ", "canary", True),
        ("stable pin at 100", route(100.0), "stable", "stable", True),
        ("pin to a missing canary", route(0.0, canary=False), "canary", "stable", False),
        ("not a role", route(100.0), "both", "canary", False),
        ("no header", route(100.0), None, "canary", False),
    ],
)
def test_only_a_pin_that_chose_the_role_marks_the_selection_pinned(
    case: str, r: Route, pin: str | None, role: str, pinned: bool
) -> None:
    chosen = select(r, draw=50.0, pin=pin)
    assert (chosen.role, chosen.pinned) == (role, pinned), case


def test_resolve_model_header_then_default_then_the_only_route() -> None:
    one = {MODEL: route(0.0)}
    two = {MODEL: route(0.0), "b": route(0.0, model="b")}
    assert resolve_model(MODEL, None, two).model == MODEL
    assert resolve_model(None, "b", two).model == "b"
    assert resolve_model("  ", "b", two).model == "b"
    assert resolve_model(None, None, one).model == MODEL
    with pytest.raises(NoModel, match="X-Preflight-Model"):
        resolve_model(None, None, two)
    with pytest.raises(NoModel, match="no routes exist yet"):
        resolve_model(None, None, {})
    with pytest.raises(UnknownModel, match="'c'"):
        resolve_model("c", None, two)


def test_table_applies_removes_and_keeps_the_previous_route_on_bad_values() -> None:
    seen: list[Change] = []
    table = RouteTable(lambda update, _: seen.append(update.change))
    assert table.apply(MODEL, route(5.0).model_dump_json().encode()).change is Change.APPLIED
    bad = table.apply(MODEL, b'{"model": "x"')
    assert bad.change is Change.MALFORMED and "does not validate" in bad.reason
    out_of_range = (
        route(5.0).model_dump_json().replace('"canary_weight":5.0', '"canary_weight":101')
    )
    assert table.apply(MODEL, out_of_range.encode()).change is Change.MALFORMED
    wrong_key = table.apply(MODEL, route(9.0, model="other").model_dump_json().encode())
    assert wrong_key.change is Change.MALFORMED and "does not match" in wrong_key.reason
    current = table.get(MODEL)
    assert current is not None and current.canary_weight == 5.0
    assert table.apply(MODEL, b"", deleted=True).change is Change.REMOVED
    assert table.get(MODEL) is None
    assert seen == [Change.APPLIED, *[Change.MALFORMED] * 3, Change.REMOVED]


def test_hop_by_hop_headers_and_those_named_in_connection_are_not_forwarded() -> None:
    headers = {
        "Connection": "keep-alive, X-Private",
        "Keep-Alive": "timeout=5",
        "Transfer-Encoding": "chunked",
        "X-Private": "secret",
        "Host": "router",
        "Authorization": "Bearer t",
        "Content-Type": "application/json",
    }
    out = forwardable(headers, frozenset({"host"}))
    assert dict(out) == {"Authorization": "Bearer t", "Content-Type": "application/json"}


def test_a_canary_without_an_upstream_takes_no_traffic_from_this_router() -> None:
    from services.contracts.events import Route, RouteTarget
    from services.router.routes import canary_live, pick_role

    route = Route(
        model="org/m",
        stable=RouteTarget(deployment_id="d-s", version="1", upstream="http://s"),
        canary=RouteTarget(deployment_id="d-c", version="2", upstream=None),
        canary_weight=50,
    )
    assert not canary_live(route)
    assert {pick_role(route, draw=d) for d in (0.0, 10.0, 49.9, 99.0)} == {"stable"}
