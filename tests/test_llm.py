"""The model client: what Parley sends to an OpenAI-compatible provider."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from openai._utils import async_maybe_transform
from openai.types.chat import completion_create_params

from parley.config import Settings
from parley.llm import open_chat_model
from tests.conftest import unique
from tests.fake_provider import FakeProvider, reply_for


def settings_for(provider: FakeProvider, tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path, openai_base_url=provider.base_url, _env_file=None, **values)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_requests_are_what_the_sdk_itself_would_send(
    provider: FakeProvider, tmp_path: Path, stream: bool
) -> None:
    """Parley skips the SDK's request transform (see ``UntransformedCompletions``); this
    fails if a new SDK's transform would change what LangChain asks it to send."""
    settings = settings_for(provider, tmp_path, openai_api_key="sk-test-key")
    question = unique("what is sent")
    prompt = [SystemMessage("Be brief."), HumanMessage("earlier"), HumanMessage(question)]
    async with open_chat_model(settings) as model:
        if stream:
            text = "".join([chunk.text async for chunk in model.astream(prompt)])
        else:
            text = (await model.ainvoke(prompt)).text
    assert text == reply_for(question)
    (call,) = provider.calls_for(question)
    assert call.stream is stream
    assert call.authorization == "Bearer sk-test-key"
    assert call.body["model"] == settings.model_name
    assert [m["content"] for m in call.body["messages"]] == ["Be brief.", "earlier", question]
    params = (
        completion_create_params.CompletionCreateParamsStreaming
        if stream
        else completion_create_params.CompletionCreateParamsNonStreaming
    )
    assert await async_maybe_transform(call.body, params) == call.body


async def test_the_embedded_models_extra_limit_reaches_the_body(
    provider: FakeProvider, tmp_path: Path
) -> None:
    settings = settings_for(provider, tmp_path, max_reply_tokens=48)
    question = unique("a limit")
    async with open_chat_model(settings, base_url=provider.base_url) as model:
        await model.ainvoke([HumanMessage(question)])
    (call,) = provider.calls_for(question)
    assert call.body["max_tokens"] == call.body["max_completion_tokens"] == 48


async def test_provider_errors_are_the_sdks_own(provider: FakeProvider, tmp_path: Path) -> None:
    import openai

    async with open_chat_model(settings_for(provider, tmp_path)) as model:
        with pytest.raises(openai.RateLimitError):
            await model.ainvoke([HumanMessage(unique("[fail:429] busy"))])
        with pytest.raises(openai.InternalServerError):
            async for _ in model.astream([HumanMessage(unique("[fail:500] broken"))]):
                pass
