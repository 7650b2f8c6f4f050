"""Traces: the request that enqueues a task and the spans of its attempts are one trace, even
when another runner runs them after a restart; without a tracer provider nothing is kept."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.backstop import Backstop
from app.observability.tracing import Tracing, enqueue_context
from app.settings import Settings
from store import tasks as store_tasks
from store.timeutil import utcnow

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def traced_app(backstop: Backstop, provider: TracerProvider) -> FastAPI:
    """A team's app whose requests run in server spans (what OpenTelemetry's ASGI
    instrumentation does), with Backstop's task API under /jobs."""
    tracer = provider.get_tracer("team")
    app = FastAPI(lifespan=backstop.lifespan)
    app.include_router(backstop.router, prefix="/jobs")

    @app.middleware("http")
    async def server_span(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        parent = propagate.extract(dict(request.headers))
        name = f"{request.method} {request.url.path}"
        with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER):
            return await call_next(request)

    return app


def test_a_trace_goes_from_the_enqueueing_request_to_each_attempt_across_a_restart(
    settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = settings.model_copy(update={"run_worker": False})

    before = Backstop(settings, tracer_provider=provider)
    with TestClient(traced_app(before, provider)) as client:
        answer = client.post(
            "/jobs/tasks",
            json={"name": "test.flaky", "args": [1]},
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
    assert answer.status_code == 202
    task_id = answer.json()["id"]
    (request_span,) = exporter.get_finished_spans()
    assert request_span.name == "POST /jobs/tasks"
    exporter.clear()

    # A new process's runner (here: a new Backstop on the same file) runs both attempts.
    after = Backstop(settings, tracer_provider=provider)
    try:
        after.prepare()
        now = utcnow()
        asyncio.run(after.runner.drain(now=now))
        asyncio.run(after.runner.drain(now=now + timedelta(seconds=5)))
        with after.db.read() as conn:
            assert store_tasks.get_task(conn, task_id).status == "succeeded"
    finally:
        after.close()

    spans = sorted(exporter.get_finished_spans(), key=_attempt)
    assert [(span.name, _attempt(span)) for span in spans] == [
        ("task test.flaky", 1),
        ("task test.flaky", 2),
    ]
    assert request_span.context is not None
    for span in spans:
        assert span.context is not None
        assert span.parent is not None
        assert f"{span.context.trace_id:032x}" == CLIENT_TRACE
        assert span.parent.span_id == request_span.context.span_id
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes is not None
        assert span.attributes["backstop.task.id"] == task_id
        assert span.attributes["backstop.task.queue"] == "default"
    first, second = spans
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "Flaky: attempt 1 of 1 planned failures"
    assert [event.name for event in first.events] == ["exception"]
    assert second.status.status_code is StatusCode.OK


def test_an_async_task_runs_in_its_span_and_its_own_spans_nest_in_it(
    backstop: Backstop, settings: Settings
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = Backstop(settings, tracer_provider=provider)
    try:
        with provider.get_tracer("team").start_as_current_span("enqueue") as enqueue:
            task = traced.tasks.enqueue("test.async_whoami")
        asyncio.run(traced.runner.drain())
    finally:
        traced.close()
    (attempt,) = [span for span in exporter.get_finished_spans() if span.name.startswith("task")]
    assert attempt.name == "task test.async_whoami"
    assert attempt.parent is not None
    assert attempt.parent.span_id == enqueue.get_span_context().span_id
    assert attempt.attributes is not None
    assert attempt.attributes["backstop.task.id"] == task.id


def test_without_a_tracer_provider_nothing_is_kept_or_made(backstop: Backstop) -> None:
    # The suite never sets the global provider: OpenTelemetry's default proxy stands in.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert Tracing().tracer() is None
    assert enqueue_context() is None
    task = backstop.tasks.enqueue("test.noop")
    assert task.trace_context is None
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, task.id).trace_context is None


def test_a_span_outside_any_provider_still_has_its_context_kept(backstop: Backstop) -> None:
    # The enqueue needs only the current span's context, whoever's tracer made it.
    provider = TracerProvider()
    with provider.get_tracer("team").start_as_current_span("request") as span:
        task = backstop.tasks.enqueue("test.noop")
    context = span.get_span_context()
    assert task.trace_context == (
        f'{{"traceparent":"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}}'
    )


def _attempt(span: ReadableSpan) -> int:
    assert span.attributes is not None
    number = span.attributes["backstop.task.attempt"]
    assert isinstance(number, int)
    return number
