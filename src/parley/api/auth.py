"""Signing up, in and out (accounts mode)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Cookie, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from parley import streams, turns
from parley.accounts import CSRF_COOKIE, SESSION_COOKIE, Account, NewSession, UsernameTaken
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
    closed = not request.app.state.settings.signup or not await accounts.signup_open()
    if closed and await accounts.any_users():
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="Sign-up is closed.")
    try:
        user = await accounts.sign_up(body.username, body.password)
    except UsernameTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="That name is taken.") from None
    _set_session(request, response, await accounts.open_session(user))
    return Me(username=user.username, is_admin=user.is_admin)


@router.post("/login", response_model=Me, responses={429: {"description": "Too many failures."}})
async def log_in(body: Credentials, request: Request, response: Response) -> Me:
    _accounts_mode(request)
    accounts = accounts_of(request)
    by_account, by_address = request.app.state.sign_in_limits
    address = request.client.host if request.client else "unknown"
    wait = by_account.retry_after(body.username) or by_address.retry_after(address)
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="Too many failed sign-ins; wait a little.",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    user = await accounts.authenticate(body.username, body.password)
    if user is None:
        by_account.record(body.username)
        by_address.record(address)
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


# --- API tokens ----------------------------------------------------------------------


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=100, description="What it is for.")


class TokenOut(BaseModel):
    id: int
    name: str
    created_at: datetime
    token: str | None = Field(
        default=None,
        description="Only in the answer that creates it: keep it, it is not shown again.",
    )


@router.post("/tokens", response_model=TokenOut, status_code=status.HTTP_201_CREATED)
async def create_token(body: NewToken, request: Request, user: SessionUser) -> TokenOut:
    """A token for scripts: send it as ``Authorization: Bearer <token>``."""
    made = await accounts_of(request).create_token(user, body.name.strip() or "token")
    return TokenOut(id=made.id, name=made.name, created_at=made.created_at, token=made.token)


@router.get("/tokens", response_model=list[TokenOut])
async def list_tokens(request: Request, user: SessionUser) -> list[TokenOut]:
    return [
        TokenOut(id=t.id, name=t.name, created_at=t.created_at)
        for t in await accounts_of(request).tokens(user)
    ]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_token(token_id: int, request: Request, user: SessionUser) -> Response:
    if not await accounts_of(request).revoke_token(user, token_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No such token of yours.")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- Administration --------------------------------------------------------------------

admin = APIRouter(prefix="/api/admin", tags=["accounts"])


async def admin_user(user: SessionUser) -> Account:
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="Only an admin may do that.")
    return user


Admin = Annotated[Account, Depends(admin_user)]


class SignupSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signup: StrictBool


@router.get("/signup", response_model=SignupSetting, tags=["accounts"])
async def signup_setting(request: Request) -> SignupSetting:
    """Whether new accounts may be created now."""
    _accounts_mode(request)
    accounts = accounts_of(request)
    return SignupSetting(signup=request.app.state.settings.signup and await accounts.signup_open())


@admin.put("/signup", response_model=SignupSetting)
async def set_signup(body: SignupSetting, request: Request, _admin: Admin) -> SignupSetting:
    """Open or close sign-up (``PARLEY_SIGNUP=false`` keeps it closed regardless)."""
    await accounts_of(request).set_signup(body.signup)
    return SignupSetting(signup=request.app.state.settings.signup and body.signup)


@admin.get("/users", response_model=list[Me])
async def list_users(request: Request, _admin: Admin) -> list[Me]:
    return [
        Me(username=u.username, is_admin=u.is_admin) for u in await accounts_of(request).usernames()
    ]


@admin.delete("/users/{username}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_user(username: str, request: Request, me: Admin) -> Response:
    """Remove a user: their sessions and tokens end at once, their chats are deleted."""
    if username == me.username:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="An admin cannot remove themselves.")
    parts = turns.services()
    if not await accounts_of(request).remove_user(username):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No such user.")
    for conversation_id in await parts.store.conversation_ids(username):
        for turn_id in await parts.store.streaming_turns(conversation_id):
            streams.request_stop_here(turn_id)
        await parts.store.delete_conversation(username, conversation_id)
        await parts.memory.delete(conversation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
