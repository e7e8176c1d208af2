"""Signing up, in and out (accounts mode)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Cookie, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from parley.accounts import CSRF_COOKIE, SESSION_COOKIE, NewSession, UsernameTaken
from parley.api.identity import SessionUser, accounts_of
from parley.api.validation import Username

router = APIRouter(prefix="/api/auth", tags=["accounts"])


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Username
    password: StrictStr = Field(min_length=8, max_length=256, description="8-256 characters.")


class Me(BaseModel):
    username: str
    is_admin: bool


def _accounts_mode(request: Request) -> None:
    if request.app.state.settings.auth != "accounts":
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail="Accounts are off (PARLEY_AUTH=open)."
        )


def _set_session(request: Request, response: Response, session: NewSession) -> None:
    secure = request.url.scheme == "https"
    response.set_cookie(
        SESSION_COOKIE,
        session.token,
        max_age=session.max_age,
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    # Readable by the page, which echoes it in the X-CSRF-Token header.
    response.set_cookie(
        CSRF_COOKIE, session.csrf_token, max_age=session.max_age, samesite="strict", secure=secure
    )


@router.post("/signup", response_model=Me, status_code=status.HTTP_201_CREATED)
async def sign_up(body: Credentials, request: Request, response: Response) -> Me:
    """Create an account and sign in. The first account is an admin."""
    _accounts_mode(request)
    accounts = accounts_of(request)
    if not request.app.state.settings.signup and await accounts.any_users():
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="Sign-up is closed.")
    try:
        user = await accounts.sign_up(body.username, body.password)
    except UsernameTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="That name is taken.") from None
    _set_session(request, response, await accounts.open_session(user))
    return Me(username=user.username, is_admin=user.is_admin)


@router.post("/login", response_model=Me)
async def log_in(body: Credentials, request: Request, response: Response) -> Me:
    _accounts_mode(request)
    accounts = accounts_of(request)
    user = await accounts.authenticate(body.username, body.password)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Wrong name or password.")
    _set_session(request, response, await accounts.open_session(user))
    return Me(username=user.username, is_admin=user.is_admin)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def log_out(
    request: Request,
    _user: SessionUser,
    parley_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    """End this session (at once, on every replica)."""
    if parley_session:
        await accounts_of(request).close_session(parley_session)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE)
    response.delete_cookie(CSRF_COOKIE)
    return response


@router.get("/me", response_model=Me)
async def me(user: SessionUser) -> Me:
    return Me(username=user.username, is_admin=user.is_admin)
