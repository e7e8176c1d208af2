"""The chat model: any OpenAI-compatible endpoint through ``langchain-openai``."""

from __future__ import annotations

import openai
from langchain_openai import ChatOpenAI

from parley.config import Settings

# What the OpenAI client raises when the provider, not Parley, is at fault.
PROVIDER_ERRORS = (openai.APIConnectionError, openai.APIStatusError)


def make_chat_model(settings: Settings) -> ChatOpenAI:
    settings.check_provider()
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return ChatOpenAI(
        model=settings.model_name,
        # Local OpenAI-compatible servers accept any key, but the client insists on one.
        api_key=api_key or "unused",
        base_url=settings.openai_base_url,
        timeout=settings.llm_timeout,
        # Retries belong to the DBOS step around the call, where they are durable and
        # visible; the client retrying inside a step would multiply them.
        max_retries=0,
    )


def is_retryable(error: BaseException) -> bool:
    """Whether asking again may succeed: network trouble, overload, server faults."""
    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return False


def describe(error: BaseException) -> str:
    """A one-line account of a provider failure, without secrets or stack traces."""
    if isinstance(error, openai.APITimeoutError):
        return "The model provider did not answer in time."
    if isinstance(error, openai.APIConnectionError):
        return "The model provider could not be reached."
    if isinstance(error, openai.AuthenticationError):
        return "The model provider refused Parley's credentials."
    if isinstance(error, openai.RateLimitError):
        return "The model provider is rate-limiting requests; try again shortly."
    if isinstance(error, openai.APIStatusError):
        return f"The model provider answered with an error (HTTP {error.status_code})."
    return "The model provider failed."
