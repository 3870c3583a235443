"""The URL table."""

from __future__ import annotations

from aiohttp import web

from server.http import views_api, views_compat, views_pages, views_session


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", views_pages.index)
    app.router.add_post("/api/chat", views_api.create_chat)
    # No HEAD for the streams: it would start work whose answer nobody could read.
    app.router.add_get("/api/chat/{id}/events", views_api.chat_events, allow_head=False)
    app.router.add_delete("/api/chat/{id}", views_api.stop_chat)
    app.router.add_get("/api/models", views_api.list_models)
    app.router.add_get("/api/session", views_session.session_state)
    app.router.add_post("/api/session", views_session.sign_in)
    app.router.add_delete("/api/session", views_session.sign_out)
    app.router.add_get("/healthz", views_api.health)
    app.router.add_get("/readyz", views_api.ready)
    app.router.add_get("/metrics", views_api.metrics)
    app.router.add_get("/stream", views_compat.legacy_stream, allow_head=False)
    app.router.add_get("/static/{path:.+}", views_pages.static_file, name="static")
