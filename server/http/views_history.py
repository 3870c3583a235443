"""Conversations stored on the server: list, read, change, delete, answer, export,
import, search, and the owner's change feed (`GET /api/changes`).

Every input is checked before anything is written. An owner is the access token's
name, or "local" without tokens; another owner's conversation is simply not found."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from server.access.middleware import PRINCIPAL, client_key
from server.history.context import CONTINUE_PROMPT, merge_same_role, model_messages
from server.history.markdown import conversation_markdown, export_filename, title_of
from server.history.stream import follow_changes
from server.http.errors import ApiError
from server.http.responses import json_response
from server.http.validation import invalid, parse_chat, raw_last_event_id, read_json_object
from server.http.views_api import (
    announced,
    check_same_request,
    discard_generation,
    launch_generation,
    start_generation,
)
from server.keys import ANSWERS, CATALOG, CLUSTER, CONFIG, FEED, OPEN_STREAMS, REGISTRY, STORE
from server.relay.generation import Generation
from server.relay.streaming import check_stream_limit
from server.store import ConversationExists

if TYPE_CHECKING:
    from server.store import Store

log = logging.getLogger(__name__)

LOCAL_OWNER = "local"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_TITLE_CHARS = 500
MAX_LIST = 200
MAX_QUERY_CHARS = 200
IMPORT_MAX_BYTES = 32 * 1024 * 1024
# Statuses of an answer that ended early with its text kept: Continue picks it up.
CONTINUABLE = frozenset({"interrupted", "stopped", "length", "error", "abandoned"})
# Shared mode: how long a message waits for what another process made of the same
# client_id (claimed first there) to be stored.
CLAIMED_WAIT = 5.0


# --- helpers -----------------------------------------------------------------------------


def owner_of(request: web.Request) -> str:
    return request.get(PRINCIPAL) or LOCAL_OWNER


def _store(request: web.Request) -> Store:
    store = request.app.get(STORE)
    if store is None:
        raise ApiError(
            404,
            "history_disabled",
            "This Rill does not store conversations ([storage] enabled = false); the page keeps them in the browser.",
        )
    return store


def _publish(request: web.Request, name: str, data: dict[str, Any]) -> None:
    if (feed := request.app.get(FEED)) is not None:
        feed.publish(owner_of(request), name, data)


def check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise invalid("bad_id", f"{field} must be 1 to 64 letters, digits, '_' or '-'.")
    return value


def _optional_id(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    return None if value is None else check_id(value, f"'{field}'")


def _path_id(request: web.Request) -> str:
    return check_id(request.match_info["id"], "The conversation id")


def _text(body: dict[str, Any], field: str, code: str, limit: int) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or _SURROGATE.search(value):
        raise invalid(code, f"'{field}' must be a string of text.")
    if len(value) > limit:
        raise invalid(code, f"'{field}' has {len(value)} characters; the limit is {limit}.")
    return value


def _only(body: dict[str, Any], allowed: AbstractSet[str]) -> None:
    if unknown := set(body) - allowed:
        raise invalid("unknown_field", f"Unknown field {sorted(unknown)[0]!r} in the request body.")


def _model(request: web.Request, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("invalid_model", "'model' must be a string.")
    if request.app[CATALOG].resolve(value) is None:
        raise invalid("unknown_model", f"Unknown model {value!r}; GET /api/models lists the available ones.")
    return value


def _new_conversation(request: web.Request, value: Any) -> dict[str, Any] | None:
    """A message's `conversation`: the conversation to make if it does not exist yet
    (title/system/model, as POST /api/conversations takes them); None when not given."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("bad_message", "'conversation' must be an object (its title, system and model).")
    _only(value, {"title", "system", "model"})
    return _new_fields(request, value)


def _new_fields(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """A new conversation's title/system/model from a request body; a title given is the user's."""
    fields = _conversation_fields(request, body)
    if fields.get("title"):
        fields["title_source"] = "user"
    return fields


def _conversation_fields(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """title/system/model of a request body, checked; only the ones it has."""
    fields: dict[str, Any] = {}
    if "title" in body:
        fields["title"] = _text(body, "title", "invalid_title", MAX_TITLE_CHARS) or ""
    if "system" in body:
        limit = request.app[CONFIG].storage.max_message_chars
        fields["system"] = _text(body, "system", "invalid_system", limit) or ""
    if "model" in body:
        fields["model"] = _model(request, body["model"])
    return fields


async def _conversation(request: web.Request, store: Store, cid: str) -> dict[str, Any]:
    conversation = await store.get_conversation(owner_of(request), cid)
    if conversation is None:
        raise ApiError(404, "conversation_not_found", "No such conversation.")
    return conversation


def _int_query(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16 or not low <= int(raw) <= high:
        raise invalid("invalid_query", f"?{name}= must be a whole number from {low} to {high}.")
    return int(raw)


# --- the history as a whole --------------------------------------------------------------


async def history_state(request: web.Request) -> web.Response:
    """What the page asks first: whether this server stores conversations, and for whom."""
    store = request.app.get(STORE)
    owner = owner_of(request)
    if store is None:
        return json_response({"enabled": False, "owner": owner, "usage": None, "auto_titles": False})
    storage = request.app[CONFIG].storage
    usage = await store.usage(owner)
    return json_response({"enabled": True, "owner": owner, "usage": usage, "auto_titles": storage.auto_titles})


async def list_conversations(request: web.Request) -> web.Response:
    store = _store(request)
    limit = _int_query(request, "limit", 1, MAX_LIST) or MAX_LIST
    before = _int_query(request, "before", 0, 2**53)
    summaries = await store.list_conversations(owner_of(request), limit=limit, before=before)
    following = summaries[-1]["updated"] if len(summaries) == limit else None
    return json_response({"conversations": summaries, "next": following})


async def create_conversation(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json_object(request)
    _only(body, {"id", "title", "system", "model"})
    data = _new_fields(request, body)
    data["id"] = _optional_id(body, "id") or uuid.uuid4().hex[:16]
    summary, created = await store.create_conversation(owner_of(request), data)
    if created:
        _publish(request, "conversation", summary)
    return json_response(summary, status=201 if created else 200)


async def get_conversation(request: web.Request) -> web.Response:
    store = _store(request)
    return json_response(await _conversation(request, store, _path_id(request)))


async def update_conversation(request: web.Request) -> web.Response:
    store = _store(request)
    cid = _path_id(request)
    body = await read_json_object(request)
    _only(body, {"title", "system", "model", "active"})
    changes = _conversation_fields(request, body)
    if "title" in changes:
        changes["title_source"] = "user" if changes["title"] else None
    if "active" in body:
        changes["active"] = _optional_id(body, "active")
    summary = await store.update_conversation(owner_of(request), cid, changes)
    if summary is None:
        raise ApiError(404, "conversation_not_found", "No such conversation.")
    _publish(request, "conversation", summary)
    return json_response(summary)


async def delete_conversation(request: web.Request) -> web.Response:
    store = _store(request)
    cid = _path_id(request)
    conversation = await _conversation(request, store, cid)
    if not await store.delete_conversation(owner_of(request), cid):
        raise ApiError(404, "conversation_not_found", "No such conversation.")
    # Its answers still streaming would run to their end for nobody: stopped (after the
    # delete, so the writer's last save finds nothing to write into).
    registry = request.app[REGISTRY]
    for message in conversation["messages"]:
        if message["status"] == "streaming" and message["generation"]:
            generation = registry.get(message["generation"])
            if generation is not None and generation.owner == request.get(PRINCIPAL):
                generation.stop()
    _publish(request, "deleted", {"id": cid})
    return web.Response(status=204)


async def delete_data(request: web.Request) -> web.Response:
    """Everything of this owner's, gone: rows and search index."""
    store = _store(request)
    counts = await store.delete_owner(owner_of(request))
    _publish(request, "reset", {})
    log.info("deleted all conversations of one owner: %d conversations", counts.get("conversations", 0))
    return json_response(counts)


async def search(request: web.Request) -> web.Response:
    store = _store(request)
    query = request.query.get("q", "")
    if not query.strip() or len(query) > MAX_QUERY_CHARS or _SURROGATE.search(query):
        raise invalid("invalid_query", f"?q= must be 1 to {MAX_QUERY_CHARS} characters of text.")
    limit = _int_query(request, "limit", 1, 100) or 30
    return json_response({"results": await store.search(owner_of(request), query, limit=limit)})


# --- export and import -------------------------------------------------------------------


def _format(request: web.Request) -> str:
    value = request.query.get("format", "json")
    if value not in ("json", "markdown"):
        raise invalid("invalid_query", "?format= must be json or markdown.")
    return value


def _attachment(filename: str) -> str:
    fallback = filename.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"


def _model_label(request: web.Request) -> Any:
    catalog = request.app[CATALOG]

    def label(model_id: str) -> str:
        resolved = catalog.resolve(model_id)
        return resolved[1].label if resolved is not None else model_id

    return label


def _export_response(request: web.Request, document: dict[str, Any], fmt: str, title: str) -> web.Response:
    if fmt == "json":
        text = json.dumps(document, ensure_ascii=False, indent=1)
        filename = export_filename(title, "json")
        content_type = "application/json"
    else:
        label = _model_label(request)
        text = "\n".join(conversation_markdown(c, label) for c in document["conversations"])
        filename = export_filename(title, "md")
        content_type = "text/markdown"
    return web.Response(text=text, content_type=content_type, headers={"Content-Disposition": _attachment(filename)})


async def export_conversation(request: web.Request) -> web.Response:
    store = _store(request)
    cid = _path_id(request)
    fmt = _format(request)
    document = await store.export(owner_of(request), [cid])
    if not document["conversations"]:
        raise ApiError(404, "conversation_not_found", "No such conversation.")
    return _export_response(request, document, fmt, title_of(document["conversations"][0]))


async def export_all(request: web.Request) -> web.Response:
    store = _store(request)
    fmt = _format(request)
    document = await store.export(owner_of(request))
    return _export_response(request, document, fmt, "conversations")


async def import_document(request: web.Request) -> web.Response:
    store = _store(request)
    owner = owner_of(request)
    # A whole history (the page's one-time upload of its localStorage) is larger than a chat
    # request; the store still holds every message to its limits.
    reading = request.clone(client_max_size=max(IMPORT_MAX_BYTES, request.client_max_size))
    document = await read_json_object(reading)
    counts = await store.import_document(owner, document)
    if counts.get("conversations") or counts.get("messages"):
        _publish(request, "reset", {})  # many conversations at once: the page refetches its list
    return json_response(counts)


# --- answering a stored conversation -----------------------------------------------------


def _derived_id(owner: str, client_id: str, cid: str, role: str) -> str:
    """The same client_id gives the same message ids, so a retry finds what it made."""
    return hashlib.sha256(f"{owner}\0{client_id}\0{cid}\0{role}".encode()).hexdigest()[:16]


def _client_id(value: Any) -> str | None:
    """client_id as parse_chat will have it (checked there), to look up its derived ids."""
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _generation_json(generation_id: str) -> dict[str, str]:
    return {"id": generation_id, "events": f"/api/chat/{generation_id}/events"}


def _track_answer(
    request: web.Request,
    generation: Generation,
    *,
    owner: str,
    conversation: str,
    message: dict[str, Any],
    keys: tuple[int, int] | None,
) -> None:
    """Hands the answer to the writer that saves it as it streams. `message` is the stored
    answer; for a continued one its content is the text kept so far."""
    request.app[ANSWERS].track(generation, owner=owner, conversation=conversation, message=message, keys=keys)


MESSAGE_FIELDS = frozenset(
    {"parent", "content", "id", "answer_id", "model", "options", "client_id", "regenerate", "continue", "conversation"}
)


async def add_message(request: web.Request) -> web.Response:
    """Adds a question (or picks the answer to regenerate or continue), builds the model's
    context from the stored branch, and starts the answer as POST /api/chat would."""
    body = await read_json_object(request)
    _only(body, MESSAGE_FIELDS)
    try:
        # A new chat's first question (`conversation` given, no parent) skips reading a
        # context that is not there yet; when the conversation exists after all (a
        # retry), the store says so before writing anything and the usual path runs.
        return await _add_message(request, body, assume_new=True)
    except ConversationExists:
        return await _add_message(request, body, assume_new=False)


async def _add_message(request: web.Request, body: dict[str, Any], *, assume_new: bool) -> web.Response:
    app = request.app
    store = _store(request)
    owner = owner_of(request)
    cid = _path_id(request)
    modes = [name for name in ("content", "regenerate", "continue") if body.get(name) is not None]
    if len(modes) != 1:
        raise invalid("bad_message", "Send exactly one of 'content' (a new question), 'regenerate' or 'continue'.")
    mode = modes[0]
    if mode != "content" and ({"parent", "id"} & set(body)):
        raise invalid("bad_message", f"'{mode}' takes no 'parent' or 'id': it answers an existing question.")
    if mode == "continue" and "answer_id" in body:
        raise invalid("bad_message", "'continue' takes no 'answer_id': the answer continues in the same message.")
    parent = _optional_id(body, "parent")
    content = _text(body, "content", "invalid_content", app[CONFIG].storage.max_message_chars)
    if mode == "content" and not (content or "").strip():
        raise invalid("invalid_content", "'content' is empty: write a question.")
    target_id = check_id(body[mode], f"'{mode}'") if mode != "content" else None
    model = _model(request, body.get("model"))
    new = _new_conversation(request, body.get("conversation"))

    # Only what answering needs: the branch sent to the model and the messages named.
    leaf = target_id if target_id is not None else parent
    named = {i for i in (body.get("id"), body.get("answer_id")) if isinstance(i, str)}
    if (client_id := _client_id(body.get("client_id"))) is not None:
        named |= {_derived_id(owner, client_id, cid, role) for role in ("user", "assistant")}
    assume_new = assume_new and new is not None and mode == "content" and parent is None
    conversation = None if assume_new else await store.context(owner, cid, leaf, named)
    if conversation is None:
        if new is None or mode != "content":
            raise ApiError(404, "conversation_not_found", "No such conversation.")
        # Made with its first question, in the same transaction (no round trip of its own).
        conversation = {"system": new.get("system"), "model": new.get("model"), "path": [], "messages": {}}
    messages: dict[str, dict[str, Any]] = conversation["messages"]
    target: dict[str, Any] | None = None
    if target_id is not None:
        target = messages.get(target_id)
        if target is None:
            raise ApiError(404, "message_not_found", "No such message in this conversation.")
        if target["role"] != "assistant":
            raise invalid("bad_target", f"'{mode}' must name an answer (an assistant message).")
        if mode == "continue" and not target["content"]:
            raise invalid("bad_target", "Only an answer that stopped early with some text can be continued.")
    elif parent is not None:
        if parent not in messages:
            raise ApiError(404, "message_not_found", "The parent message is not in this conversation.")
        if messages[parent]["role"] != "assistant":
            raise invalid("bad_target", "'parent' must be an answer (or null for the first question).")

    # The model's context: the stored branch up to the question being answered.
    system = conversation["system"] or ""
    if target is not None:
        path = conversation["path"][:-1]  # root .. the question the target answers
        history = model_messages(system, path)
        if mode == "continue":
            extra = [{"role": "assistant", "content": target["content"]}, {"role": "user", "content": CONTINUE_PROMPT}]
            history = merge_same_role([*history, *extra])
    else:
        history = merge_same_role(
            [*model_messages(system, conversation["path"]), {"role": "user", "content": content or ""}]
        )
    if model is None:
        stored = [target.get("model") if target is not None else None, conversation.get("model")]
        model = next((m for m in stored if m and app[CATALOG].resolve(m) is not None), None)
    chat_body: dict[str, Any] = {"messages": history, "model": model}
    for name in ("options", "client_id"):
        if name in body:
            chat_body[name] = body[name]
    chat = parse_chat(chat_body, app[CATALOG], app[CONFIG].limits)  # the limits of POST /api/chat

    # What identifies this request, so a retry with the same client_id is recognised.
    fingerprint = hashlib.sha256(
        json.dumps(
            [cid, mode, parent, content, target_id, body.get("id"), body.get("answer_id"), chat.fingerprint()],
            ensure_ascii=False,
        ).encode()
    ).hexdigest()
    # As POST /api/chat: client_ids are per token, one token's ids never find another's.
    registry_client_id = chat.client_id
    if registry_client_id is not None and request.get(PRINCIPAL) is not None:
        registry_client_id = f"{owner}/{registry_client_id}"
    question_id = _optional_id(body, "id")
    answer_id = _optional_id(body, "answer_id")
    if chat.client_id is not None:
        question_id = question_id or _derived_id(owner, chat.client_id, cid, "user")
        answer_id = answer_id or _derived_id(owner, chat.client_id, cid, "assistant")
    question_id = question_id or uuid.uuid4().hex[:16]
    answer_id = (target_id if mode == "continue" else answer_id) or uuid.uuid4().hex[:16]

    existing = app[REGISTRY].find_by_client_id(registry_client_id) if registry_client_id else None
    if existing is not None:
        if existing.fingerprint != fingerprint:
            raise ApiError(
                409,
                "client_id_reused",
                "This client_id was already used for a different request; make a new one per message.",
            )
        made = messages.get(answer_id)
        if made is not None and made["generation"] == existing.id:
            return _repeat(messages, mode, question_id, answer_id, existing.id)
        # The first attempt failed before its answer was stored (database down): try again.
    elif mode != "continue" and answer_id in messages:
        # Sent before, and its generation already forgotten: what was made then stands.
        return _repeat(messages, mode, question_id, answer_id, messages[answer_id]["generation"])
    if mode == "continue" and target is not None and target["status"] not in CONTINUABLE:
        # Checked after the repeat above: a continued answer is streaming again.
        raise invalid("bad_target", "Only an answer that stopped early with some text can be continued.")

    generation_id = uuid.uuid4().hex
    claim = None
    if registry_client_id is not None and CLUSTER in app:
        # Claimed in Redis first, as POST /api/chat does: the same message sent to another
        # process at the same moment gets this answer instead of asking the model again.
        from server.cluster.admission import Claim  # redis-py: shared mode only

        claim = Claim(generation_id, fingerprint, chat.request.model.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIMED_WAIT
        while (earlier := await app[CLUSTER].claim(registry_client_id, claim)) is not None:
            check_same_request(earlier.fingerprint, fingerprint)
            # The first try stores its rows before it asks the model: its answer, once
            # stored, is this request's. Until then it is on its way, or it failed and
            # gave the client_id back (the next claim is then this request's).
            found = await store.context(owner, cid, None, named)
            made = found["messages"] if found is not None else {}
            if answer_id in made and made[answer_id]["generation"] == earlier.generation_id:
                return _repeat(made, mode, question_id, answer_id, earlier.generation_id)
            if loop.time() >= deadline:
                from server.cluster.remote import unavailable

                raise unavailable()  # its process stopped short of storing, or cannot
            await asyncio.sleep(0.05)
    # Every limit checked and its place taken now, but the model is asked only once the
    # rows are in (launch below): a refusal by the store never asks it. keep_unread from
    # the start: the history reads it, and a busy database must not let the grace period
    # abandon it first.
    try:
        generation = await start_generation(
            request,
            chat.request,
            client_id=registry_client_id,
            fingerprint=fingerprint,
            keep_unread=app[CONFIG].storage.keep_unread,
            launch=False,
            generation_id=generation_id,
        )
    except BaseException:
        if registry_client_id is not None and claim is not None:
            await app[CLUSTER].release_claim(registry_client_id, claim)  # refused: the client_id may be used again
        raise
    try:
        if mode == "continue":
            assert target is not None
            # Adds nothing, but is refused like the rest over quota.
            await _check_quota(store, owner, 0, "")
            await store.save_answer(
                owner,
                cid,
                answer_id,
                content=target["content"],
                reasoning=target["reasoning"],
                last_event_id=0,
                status="streaming",
                generation=generation.id,
            )
            question = None
            answer = {**target, "status": "streaming", "generation": generation.id, "last_event_id": 0}
            answer.update({"finish_reason": None, "error": None, "usage": None})
            summary = await store.summary(owner, cid)
            keys = None
        else:
            asked = None
            if mode == "content":
                asked = {"id": question_id, "parent": parent, "role": "user", "content": content}
            made = await store.add_exchange(
                owner,
                cid,
                asked,
                {
                    "id": answer_id,
                    "parent": (target or {}).get("parent"),
                    "role": "assistant",
                    "content": "",
                    "status": "streaming",
                    "model": chat.request.model.id,
                    "generation": generation.id,
                },
                create=new,
                only_new=assume_new,
            )
            question, answer, summary, keys = made["question"], made["answer"], made["summary"], made["keys"]
    except BaseException:
        discard_generation(request, generation)  # nothing stored to answer into: the model is not asked
        if registry_client_id is not None and claim is not None:
            await app[CLUSTER].release_claim(registry_client_id, claim)
        raise
    _track_answer(request, generation, owner=owner, conversation=cid, message=answer, keys=keys)
    launch_generation(request, generation)
    await announced(request, generation)
    log.info("generation %s started for a stored conversation: model=%s mode=%s", generation.id, model, mode)
    if question is not None:
        _publish(request, "message", {"conversation": cid, "message": question})
    _publish(request, "message", {"conversation": cid, "message": answer})
    if summary is not None:
        _publish(request, "conversation", summary)
    return json_response(
        {"message": question, "answer": answer, "generation": _generation_json(generation.id)}, status=201
    )


async def _check_quota(store: Store, owner: str, adding: int, content: str) -> None:
    """Refuses before the model is asked (the store checks again as it writes): a question
    must not be stored without the answer it was sent for."""
    usage = await store.usage(owner)
    if usage["messages"] + adding > usage["max_messages"]:
        raise ApiError(
            409,
            "quota_messages",
            f"You have reached the limit of {usage['max_messages']} messages: delete some conversations to add more.",
        )
    if usage["bytes"] + len(content.encode()) > usage["max_bytes"]:
        raise ApiError(
            413,
            "quota_bytes",
            f"Your conversations have reached the storage limit of {usage['max_bytes']} bytes: "
            "delete some to add more.",
        )


def _repeat(
    messages: dict[str, dict[str, Any]], mode: str, question_id: str, answer_id: str, generation_id: str | None
) -> web.Response:
    """The answer to a request sent again: what the first one made, no new upstream request."""
    answer = messages[answer_id]
    if generation_id is None:  # an imported answer's id: not one this request made
        raise ApiError(409, "client_id_reused", "These message ids are already used; make new ones per message.")
    question = messages.get(question_id) if mode == "content" else None
    log.info("generation %s: repeated request, no new upstream request", generation_id)
    return json_response({"message": question, "answer": answer, "generation": _generation_json(generation_id)})


# --- the change feed ---------------------------------------------------------------------


async def changes(request: web.Request) -> web.StreamResponse:
    """The owner's changes as SSE, resumable by Last-Event-ID within this process's life."""
    _store(request)
    app = request.app
    feed = app[FEED]
    owner = owner_of(request)
    raw = raw_last_event_id(request)
    after = feed.latest(owner) if not raw else feed.parse_id(owner, raw)
    config, streams, reader = app[CONFIG], app[OPEN_STREAMS], client_key(request)
    check_stream_limit(streams, reader, config.limits.max_streams_per_client)
    return await follow_changes(
        request, feed, owner, after=after, streams=streams, config=config.stream, client_key=reader
    )
