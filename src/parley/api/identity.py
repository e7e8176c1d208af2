"""Who is asking: for now the name the example's page asks for.

The name comes in an ``X-Parley-User`` header or a ``parley_user`` cookie (set by the
page's name prompt). It is an identity, not a credential: anyone who can reach the port
can claim any name. Accounts replace this.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote

from fastapi import Cookie, Depends, Header, HTTPException, status
from pydantic import TypeAdapter, ValidationError

from parley.api.validation import Username

_username = TypeAdapter(Username)


async def current_user(
    x_parley_user: Annotated[
        str | None, Header(description="The name the conversations belong to.")
    ] = None,
    parley_user: Annotated[
        str | None, Cookie(description="The same name, as the page stores it.")
    ] = None,
) -> str:
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


User = Annotated[str, Depends(current_user)]
