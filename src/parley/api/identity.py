"""Who is asking.

**Open mode** (the default, for one person on their own machine): the name the example's
page asks for, from an ``X-Parley-User`` header or a ``parley_user`` cookie (set by the
page's name prompt). It is an identity, not a credential: anyone who can reach the port
can claim any name.

**Accounts mode** (``PARLEY_AUTH=accounts``): the user of the session in the HttpOnly
``parley_session`` cookie, whose data belongs to the account's immutable id (``uid``),
never to its name, which a removed account frees for someone else. A request that
changes something must also carry the session's CSRF token in an ``X-CSRF-Token``
header (the page reads it from the ``parley_csrf`` cookie), which a page of another site
cannot do.
"""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import unquote

from fastapi import Cookie, Depends, Header, HTTPException, Request, status
from pydantic import TypeAdapter, ValidationError

from parley.accounts import Account, Accounts
from parley.api.validation import Username

_username = TypeAdapter(Username)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def accounts_of(request: Request) -> Accounts:
    return request.app.state.accounts  # type: ignore[no-any-return]


def _accounts_mode(request: Request) -> bool:
    return request.app.state.settings.auth == "accounts"


async def session_user(
    request: Request,
    parley_session: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    x_csrf_token: Annotated[
        str | None, Header(description="Accounts mode: the session's CSRF token.")
    ] = None,
) -> Account:
    if not _accounts_mode(request):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Accounts are off.")
    # Scripts sign their requests with an API token instead; no cookie, so no CSRF.
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        user = await accounts_of(request).token_user(authorization[7:].strip())
        if user is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Unknown or revoked token.")
        return user
    session = await accounts_of(request).session(parley_session) if parley_session else None
    if session is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Sign in first.")
    if request.method not in SAFE_METHODS and not (
        x_csrf_token and hmac.compare_digest(x_csrf_token, session.csrf_token)
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="Missing or wrong X-CSRF-Token header (it echoes the parley_csrf cookie).",
        )
    return session.user


SessionUser = Annotated[Account, Depends(session_user)]


async def current_user(
    request: Request,
    x_parley_user: Annotated[
        str | None, Header(description="Open mode: the name the conversations belong to.")
    ] = None,
    parley_user: Annotated[
        str | None, Cookie(description="Open mode: the same name, as the page stores it.")
    ] = None,
    parley_session: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    x_csrf_token: Annotated[
        str | None, Header(description="Accounts mode: the session's CSRF token.")
    ] = None,
) -> str:
    if _accounts_mode(request):
        return (await session_user(request, parley_session, x_csrf_token)).uid
    # The page stores the name percent-encoded, since a cookie cannot hold every character.
    name = x_parley_user if x_parley_user is not None else unquote(parley_user or "") or None
    if name is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Say who you are: send an X-Parley-User header or a parley_user cookie.",
        )
    try:
        return _username.validate_python(name)
    except ValidationError as error:
        message = error.errors()[0]["msg"]
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[{"loc": ["header", "X-Parley-User"], "msg": message, "type": "value_error"}],
        ) from None


# Who owns what the request reads or writes: the name in open mode, the account's uid in
# accounts mode.
User = Annotated[str, Depends(current_user)]


async def seed_caller(
    request: Request,
    parley_session: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    x_csrf_token: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Account | None:
    """For the example's routes: None in open mode (the body names the user), the signed-in
    account in accounts mode."""
    if not _accounts_mode(request):
        return None
    return await session_user(request, parley_session, x_csrf_token)


SeedCaller = Annotated[Account | None, Depends(seed_caller)]
