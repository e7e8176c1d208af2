"""Signing up, in and out (accounts mode)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Cookie, Depends, HTTPException, Request, Response, status
from fastapi import Path as FastPath
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from parley import deletion, turns
from parley.accounts import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Account,
    HashingBusy,
    NewSession,
    RemovingSelf,
    SignUpClosed,
    UsernameTaken,
)
from parley.api.identity import SessionUser, accounts_of
from parley.api.validation import (
    MAX_ID,
    USERNAME_MAX_CHARS,
    SignInName,
    StorableText,
    Username,
    ValidUnicode,
)
from parley.limits import Limited

router = APIRouter(prefix="/api/auth", tags=["accounts"])


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Annotated[Username, StorableText]
    password: Annotated[StrictStr, ValidUnicode] = Field(
        min_length=8, max_length=256, description="8-256 characters."
    )


class SignIn(Credentials):
    # Any name an account has, also one made before today's name rules.
    username: Annotated[SignInName, StorableText]  # type: ignore[assignment]


class Me(BaseModel):
    username: str
    is_admin: bool


def _accounts_mode(request: Request) -> None:
    if request.app.state.settings.auth != "accounts":
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail="Accounts are off (PARLEY_AUTH=open)."
        )


def _address(request: Request) -> str:
    """The client's address (behind a proxy, the one it forwards: see the README)."""
    return request.client.host if request.client else "unknown"


def _too_many(limited: Limited, detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=detail,
        headers={"Retry-After": limited.retry_after_header},
    )


def _busy() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="Too many passwords are being checked at once; try again in a moment.",
        headers={"Retry-After": str(HashingBusy.retry_after)},
    )


_REFUSALS: dict[int | str, dict[str, str]] = {
    429: {"description": "Too many attempts: see Retry-After."},
    503: {"description": "Too many passwords being checked at once: see Retry-After."},
}


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


@router.post(
    "/signup",
    response_model=Me,
    status_code=status.HTTP_201_CREATED,
    responses={
        403: {"description": "Sign-up is closed."},
        409: {"description": "The name is taken (in any case or Unicode spelling)."},
        **_REFUSALS,
    },
)
async def sign_up(body: Credentials, request: Request, response: Response) -> Me:
    """Create an account and sign in. The first account is an admin."""
    _accounts_mode(request)
    accounts = accounts_of(request)
    try:
        user = await accounts.sign_up(
            body.username,
            body.password,
            address=_address(request),
            signup_enabled=request.app.state.settings.signup,
        )
    except SignUpClosed:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="Sign-up is closed.") from None
    except UsernameTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="That name is taken.") from None
    except Limited as limited:
        raise _too_many(limited, "Too many sign-ups from your address; wait a while.") from None
    except HashingBusy:
        raise _busy() from None
    _set_session(request, response, await accounts.open_session(user))
    return Me(username=user.username, is_admin=user.is_admin)


@router.post("/login", response_model=Me, responses=_REFUSALS)
async def log_in(body: SignIn, request: Request, response: Response) -> Me:
    """Sign in, by the account's name in any case or Unicode spelling."""
    _accounts_mode(request)
    accounts = accounts_of(request)
    try:
        user = await accounts.authenticate(body.username, body.password, address=_address(request))
    except Limited as limited:
        raise _too_many(limited, "Too many failed sign-ins; wait a little.") from None
    except HashingBusy:
        raise _busy() from None
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


# --- API tokens ----------------------------------------------------------------------


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, StorableText] = Field(
        min_length=1, max_length=100, description="What it is for."
    )


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
async def revoke_token(
    token_id: Annotated[int, FastPath(ge=1, le=MAX_ID)], request: Request, user: SessionUser
) -> Response:
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
async def remove_user(
    username: Annotated[str, FastPath(min_length=1, max_length=USERNAME_MAX_CHARS), StorableText],
    request: Request,
    me: Admin,
) -> Response:
    """Remove a user: their sessions and tokens end at once, their chats are deleted, all
    in one transaction. The name is free again; nothing of theirs goes with it."""
    try:
        removed = await accounts_of(request).remove_user(username, keep=me)
    except RemovingSelf:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="An admin cannot remove themselves."
        ) from None
    if removed is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No such user.")
    parts = turns.services()
    await deletion.finish_deleting(parts.store, parts.memory, removed)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
