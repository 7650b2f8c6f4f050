"""`/metrics`: the Prometheus text of this process's Backstop (see `app.observability.metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import Service
from app.observability.metrics import render


def metrics(service: Service) -> Response:
    """This process's task metrics and the queues' state, in Prometheus's text format."""
    # A plain `def`: FastAPI runs it in its thread pool, and the scrape's read of the
    # database keeps off the event loop.
    return Response(render(service.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def add_routes(router: APIRouter) -> None:
    """Add `/metrics` to `router`."""
    router.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        tags=["metrics"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
