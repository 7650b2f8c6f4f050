"""A property of the enqueue path, over arbitrary JSON: `POST /tasks` answers 202 or a 4xx
with a `detail`, never a 5xx; and every task it accepts reads back as it was sent, through
`GET /tasks/{id}` and `GET /tasks`.

The bodies are written by hand (`body_text`), because they hold what Python's JSON encoder
refuses or cannot reach: lone surrogates, NaN and infinities, numbers past any machine
type, and nesting deeper than the encoder's recursion limit. Derandomized, with a bounded
number of examples, so that a run takes seconds and finds the same things every time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import task

NAME = "test_property.anything"
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=8)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400]),
    st.floats(),  # NaN and both infinities included
    st.sampled_from([1e308, -1e308, 5e-324, -0.0]),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


@task(name=NAME)
def anything(*args: Any, **kwargs: Any) -> None:
    """Takes any JSON arguments at all."""


@dataclass(frozen=True)
class Nested:
    """`value` inside `depth` arrays (or objects under the key "k"): written as text, since
    past some 990 levels no Python encoder reaches the middle."""

    value: Any
    depth: int
    objects: bool

    def text(self) -> str:
        inner = dump(self.value)
        if self.objects:
            return '{"k":' * self.depth + inner + "}" * self.depth
        return "[" * self.depth + inner + "]" * self.depth

    def python(self) -> Any:
        value = self.value
        for _ in range(self.depth):
            value = {"k": value} if self.objects else [value]
        return value


ARGUMENTS = st.one_of(
    VALUES,
    VALUES,
    VALUES,
    st.builds(
        Nested,
        VALUES,
        st.one_of(st.integers(0, 70), st.integers(0, 1200)),
        st.booleans(),
    ),
)
OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "queue": TEXT,
        "priority": NUMBERS,
        "delay": NUMBERS,
        "max_attempts": NUMBERS,
        "run_at": st.sampled_from(
            [
                "2030-01-01T00:00:00Z",
                "9999-12-31T23:59:59-01:00",
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59Z",
                "2030-01-01T00:00:00",
            ]
        ),
    },
)


def dump(value: Any) -> str:
    """JSON text as a lenient client writes it: NaN, Infinity and lone surrogates (as
    `\\uXXXX` escapes) included."""
    if isinstance(value, Nested):
        return value.text()
    if isinstance(value, list):
        return "[" + ",".join(dump(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def python(value: Any) -> Any:
    """The value a JSON reader makes of what `dump` wrote."""
    if isinstance(value, Nested):
        return value.python()
    if isinstance(value, list):
        return [python(item) for item in value]
    if isinstance(value, dict):
        return {k: python(v) for k, v in value.items()}
    return value


def body_text(args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]) -> str:
    fields = {"name": NAME, **options}
    parts = [f"{dump(k)}:{dump(v)}" for k, v in fields.items()]
    parts.append('"args":' + dump(args))
    parts.append('"kwargs":' + dump(kwargs))
    return "{" + ",".join(parts) + "}"


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    # The client (its app and database) is made once for the whole run, on purpose: the
    # tasks accepted by earlier examples must not disturb later reads.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    args=st.lists(ARGUMENTS, max_size=3),
    kwargs=st.dictionaries(TEXT, ARGUMENTS, max_size=3),
    options=OPTIONS,
)
def test_enqueue_answers_202_or_a_4xx_and_what_it_accepts_reads_back(
    client: TestClient, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
) -> None:
    response = client.post(
        "/tasks",
        content=body_text(args, kwargs, options).encode("utf-8"),
        headers={"content-type": "application/json"},
    )

    assert response.status_code < 500, response.text
    if response.status_code != 202:
        assert 400 <= response.status_code < 500
        assert response.json()["detail"], response.text
        return
    accepted = response.json()
    assert accepted["args"] == python(args)
    assert accepted["kwargs"] == python(kwargs)
    one = client.get(f"/tasks/{accepted['id']}")
    assert one.status_code == 200, one.text
    assert one.json() == accepted
    page = client.get(f"/tasks?name={NAME}&limit=5")
    assert page.status_code == 200, page.text
    assert accepted in page.json()["items"]
