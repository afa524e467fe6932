"""The HTTP route, registered from `on_app_started` (so it exists with `--nowebui` too).

    GET  /concept-eraser/v1/status              active erasures on the loaded checkpoint
    GET  /concept-eraser/v1/methods             methods and their parameters (defaults, ranges, help)
    GET  /concept-eraser/v1/weights?keys=a,b    SHA-256 of live tensors (default: cross-attention K/V)
    POST /concept-eraser/v1/erase               {"method", "erase", "guide", "preserve", "params"}
    POST /concept-eraser/v1/restore             {}
    POST /concept-eraser/v1/save                {"format": checkpoint|patch|lora, "name", "overwrite"}
    POST /concept-eraser/v1/encode              {"prompts": [...]}: the text features the solver gets

Errors answer {"error": message, "field": name}: 400 for bad input, 409 when the state does not allow
the action (no model, nothing erased, file exists, interrupted), 422 for a model the solver cannot edit.
`handle` is the whole logic, free of FastAPI; `register` only wires it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

from concept_eraser.errors import Cancelled, EraserError, InvalidParameterError, UnsupportedModelError
from concept_eraser.methods import METHODS

from .host import NoModelError
from .inputs import RequestError, parse_erase, parse_prompts, parse_save

log = logging.getLogger("concept_eraser")
PREFIX = "/concept-eraser/v1"


def methods_table() -> dict:
    out = {}
    for name, method in METHODS.items():
        out[name] = {
            "title": method.title, "summary": method.summary,
            "params": [{"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help,
                        "min": p.min, "max": p.max, "choices": list(p.choices) if p.choices else None,
                        "nullable": p.nullable} for p in method.params],
        }
    return out


def jsonable(value: Any) -> Any:
    """Reports hold tuples, numpy/torch scalars and the odd non-finite float: make them plain JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return jsonable(value.item())
    return str(value)


def error_payload(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, RequestError):
        return exc.status, {"error": exc.message, "field": exc.field}
    if isinstance(exc, InvalidParameterError):
        top_level = ("erase", "guide", "preserve", "method", "format", "name")
        field = exc.field if exc.field in top_level else f"params.{exc.field}"
        return 400, {"error": exc.detail, "field": field}
    if isinstance(exc, NoModelError):
        return 409, {"error": str(exc), "field": "model"}
    if isinstance(exc, Cancelled):
        return 409, {"error": str(exc), "field": None}
    if isinstance(exc, UnsupportedModelError):
        return 422, {"error": str(exc), "field": "model"}
    if isinstance(exc, EraserError):
        return 422, {"error": str(exc), "field": None}
    log.exception("concept_eraser: internal error")
    return 500, {"error": f"internal error: {type(exc).__name__}: {exc}", "field": None}


def handle(service, action: str, body: Any = None, query: dict | None = None) -> tuple[int, dict]:
    """(status code, JSON payload) for one request; never raises."""
    try:
        if action == "status":
            return 200, jsonable(service.status())
        if action == "methods":
            return 200, jsonable(methods_table())
        if action == "weights":
            keys = [k for k in (query or {}).get("keys", "").split(",") if k.strip()]
            return 200, jsonable(service.weights([k.strip() for k in keys] or None))
        if action == "erase":
            return 200, jsonable(service.erase(parse_erase(body)))
        if action == "restore":
            if body not in (None, {}) and not isinstance(body, dict):
                raise RequestError("body", "must be a JSON object (or empty)")
            if body:
                raise RequestError(sorted(body)[0], "unknown field; restore takes no fields")
            return 200, jsonable(service.restore())
        if action == "save":
            return 200, jsonable(service.save(parse_save(body)))
        if action == "encode":
            return 200, jsonable(service.encode(parse_prompts(body)))
        return 404, {"error": f"unknown action {action!r}", "field": None}
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return error_payload(exc)


def parse_body(raw: bytes) -> Any:
    if not raw or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"is not valid JSON ({exc})") from None


def register(app, service_for: Callable[[], Any]) -> None:
    """Add the routes to the WebUI's FastAPI app (`on_app_started(demo, app)`)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    def endpoint(action: str, with_body: bool):
        async def run(request: Request):
            try:
                body = parse_body(await request.body()) if with_body else None
            except RequestError as exc:
                status, payload = error_payload(exc)
                return JSONResponse(payload, status_code=status)
            status, payload = await run_in_threadpool(handle, service_for(), action, body, dict(request.query_params))
            return JSONResponse(payload, status_code=status)

        run.__name__ = f"concept_eraser_{action}"
        run.__annotations__ = {"request": Request}  # this module's annotations are strings FastAPI cannot resolve
        return run

    for action in ("status", "methods", "weights"):
        app.add_api_route(f"{PREFIX}/{action}", endpoint(action, False), methods=["GET"])
    for action in ("erase", "restore", "save", "encode"):
        app.add_api_route(f"{PREFIX}/{action}", endpoint(action, True), methods=["POST"])
