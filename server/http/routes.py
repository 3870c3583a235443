"""The URL table."""

from __future__ import annotations

from aiohttp import web

from server.http import views_api, views_compat, views_history, views_pages, views_session


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
    app.router.add_get("/api/history", views_history.history_state)
    app.router.add_get("/api/conversations", views_history.list_conversations)
    app.router.add_post("/api/conversations", views_history.create_conversation)
    app.router.add_get("/api/conversations/{id}", views_history.get_conversation)
    app.router.add_patch("/api/conversations/{id}", views_history.update_conversation)
    app.router.add_delete("/api/conversations/{id}", views_history.delete_conversation)
    app.router.add_post("/api/conversations/{id}/messages", views_history.add_message)
    app.router.add_get("/api/conversations/{id}/export", views_history.export_conversation)
    app.router.add_get("/api/export", views_history.export_all)
    app.router.add_post("/api/import", views_history.import_document)
    app.router.add_delete("/api/data", views_history.delete_data)
    app.router.add_get("/api/search", views_history.search)
    app.router.add_get("/api/changes", views_history.changes, allow_head=False)
    app.router.add_get("/healthz", views_api.health)
    app.router.add_get("/readyz", views_api.ready)
    app.router.add_get("/metrics", views_api.metrics)
    app.router.add_get("/stream", views_compat.legacy_stream, allow_head=False)
    app.router.add_get("/static/{path:.+}", views_pages.static_file, name="static")
