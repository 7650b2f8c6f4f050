"""OpenTelemetry traces: a task keeps the trace context of the span that enqueued it, and
each attempt runs in a span whose parent is that context, so a request's trace shows the
background work it caused, whichever process runs it and however long after.

On only where OpenTelemetry is: the API imported once, here (guarded: without it every
function below answers at once), and a tracer provider configured (the SDK's, installed with
the `otel` extra, set globally or handed to `Backstop(tracer_provider=...)`). Until then an
enqueue reads one context variable, and an attempt reads the clock (the global provider is
looked up once a second at most).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import ProxyTracerProvider, SpanKind, StatusCode
except ImportError:  # the API is absent: tracing is off
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from store.models import Claim
    from store.outcomes import Outcome

TRACER_NAME = "backstop"
LOOK_EVERY = 1.0  # seconds between two looks for a global tracer provider, while none is set


def enqueue_context() -> str | None:
    """The current span's trace context as JSON (`{"traceparent": ..., "tracestate": ...}`,
    as the configured propagator writes it); None outside a span or without OpenTelemetry."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, separators=(",", ":")) if carrier else None


class Tracing:
    """Finds the tracer an attempt's span comes from: `provider`'s, or the global one once
    an application has configured it (None until then: no span)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._tracer: Tracer | None = None
        self._next_look = 0.0
        if provider is not None and trace is not None:
            self._tracer = provider.get_tracer(TRACER_NAME)

    def tracer(self) -> Tracer | None:
        """The tracer, or None while tracing is off."""
        if self._tracer is not None or trace is None:
            return self._tracer
        # Looking up the global provider reads the environment: once a second is enough to
        # notice an application that configures OpenTelemetry after Backstop started.
        now = time.monotonic()
        if now < self._next_look:
            return None
        self._next_look = now + LOOK_EVERY
        provider = trace.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider):
            return None  # nothing configured yet (it can be set once, later)
        self._tracer = provider.get_tracer(TRACER_NAME)
        return self._tracer


@contextlib.contextmanager
def attempt_span(tracer: Tracer, claim: Claim) -> Iterator[Span]:
    """The span an attempt runs in, current while it runs: a child of the enqueueing span's
    context when the task kept one, else a trace of its own."""
    parent = None
    if claim.trace_context is not None:
        try:
            carrier = json.loads(claim.trace_context)
        except ValueError:
            carrier = None
        if isinstance(carrier, dict):
            parent = propagate.extract(carrier)
    attributes: dict[str, str | int] = {
        "backstop.task.id": claim.id,
        "backstop.task.name": claim.name,
        "backstop.task.queue": claim.queue,
        "backstop.task.attempt": claim.attempts,
    }
    with tracer.start_as_current_span(
        f"task {claim.name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


def ended(span: Span, outcome: Outcome) -> Outcome:
    """Mark `span` with how the attempt ended; returns the outcome."""
    if outcome.error is None:
        span.set_status(StatusCode.OK)
    else:
        span.set_status(StatusCode.ERROR, outcome.error)
        event = {"exception.message": outcome.error}
        if outcome.traceback is not None:
            event["exception.stacktrace"] = outcome.traceback
        span.add_event("exception", event)
    return outcome
