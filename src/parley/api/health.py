"""Probes for load balancers and orchestrators: is the process up, can it serve chats."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from parley import turns

router = APIRouter(tags=["operations"])

# A provider is asked at most this often; load balancers probe every few seconds.
PROVIDER_CHECK_SECONDS = 10.0
CHECK_TIMEOUT = 3.0


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    model: str


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and its event loop answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The database or the model is down."}},
)
async def readyz(request: Request) -> JSONResponse:
    """Whether Parley can serve a chat now: its database and its model answer."""
    database, model = await asyncio.gather(_database(), _model(request))
    ready = database == "ok" and model == "ok"
    body = Readiness(status="ready" if ready else "not ready", database=database, model=model)
    return JSONResponse(
        body.model_dump(),
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


async def _database() -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await turns.services().store.ping()
    except Exception as error:  # any failure means "not ready"; the reason is reported
        return f"unreachable: {type(error).__name__}"
    return "ok"


async def _model(request: Request) -> str:
    local = request.app.state.local_model
    settings = request.app.state.settings
    if local is not None:
        url, headers = f"{local.base_url}/models", {}
    else:
        cached = request.app.state.provider_check
        if cached is not None and time.monotonic() - cached[0] < PROVIDER_CHECK_SECONDS:
            return str(cached[1])
        base = (settings.openai_base_url or "https://api.openai.com/v1").rstrip("/")
        key = settings.openai_api_key
        url = f"{base}/models"
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT) as client:
            response = await client.get(url, headers=headers)
        result = _judge(response)
    except httpx.HTTPError as error:
        result = f"unreachable: {type(error).__name__}"
    if local is None:
        request.app.state.provider_check = (time.monotonic(), result)
    return result


def _judge(response: httpx.Response) -> str:
    """What the provider's answer to ``GET /models`` says of it: only a JSON answer with
    2xx is ready; a wrong key or a base URL that is not an OpenAI-compatible API is not."""
    code = response.status_code
    if code in (401, 403):
        return f"rejected: the key was refused (HTTP {code})"
    if code == 404:
        return "not found: the base URL has no /models (is it the API's /v1 URL?)"
    if code == 429:
        return "rate-limited (HTTP 429)"
    if not 200 <= code < 300:
        return f"HTTP {code}"
    try:
        listing = response.json()
    except ValueError:
        listing = None
    if not isinstance(listing, dict):
        return "not an OpenAI-compatible API: /models did not answer with a JSON object"
    return "ok"
