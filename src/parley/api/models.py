"""The models a conversation may use (``PARLEY_MODELS``, beside the default one)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from parley.api.identity import User

router = APIRouter(prefix="/api", tags=["conversations"])


class ModelOut(BaseModel):
    name: str = Field(description="What `PATCH /api/conversations/{id}` takes as `model`.")
    default: bool = Field(description="Whether conversations use it unless they pick another.")


@router.get("/models", response_model=list[ModelOut])
async def list_models(_user: User, request: Request) -> list[ModelOut]:
    """The models conversations may use, the default first. Their providers' addresses
    and keys stay on the server."""
    models = request.app.state.models
    return [ModelOut(name=name, default=name == models.default) for name in models.names]
