"""Issue 25, items 1 and 3: the configuration users start from — openai-python behind APIM with a
deployment-scoped ``base_url``, ``api_version="2024-02-01"`` and the key in ``default_headers`` — works
through apimvault with the same ``base_url``, and keeps every promise of the ``azure_endpoint`` path.

Real openai clients over TLS to the local stack, its gateway serving the Azure OpenAI API under the default
``/openai`` suffix and under none.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from apimvault import (
    AsyncSubscriptionKeyProvider,
    ConfigurationError,
    InsecureTransportError,
    KeyInHeadersError,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
    refusal_stats,
)
from apimvault.local import DEPLOYMENT, LocalAzure, temporary_environ
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

API_VERSION = "2024-02-01"  # the published snippet's
MESSAGES = user_messages("hello")
HEADER = "Ocp-Apim-Subscription-Key"
README = Path(__file__).resolve().parents[2] / "README.md"
SUFFIXES = ["openai", ""]  # the local gateway's default API URL suffix, and none (the API at the root)


@pytest.fixture
def suffixed(azure: LocalAzure, suffix: str) -> Iterator[LocalAzure]:
    """The session's stack serving the Azure OpenAI API under ``suffix`` for this test."""
    azure.gateway.configure_api(suffix=suffix)
    try:
        yield azure
    finally:
        azure.gateway.configure_api(suffix="openai")


@pytest.fixture
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


def deployment_url(azure: LocalAzure, suffix: str) -> str:
    prefix = f"/{suffix}" if suffix else ""
    return f"{azure.gateway_url}{prefix}/deployments/{DEPLOYMENT}"


def published_snippet(base_url: str, key: str) -> openai.AzureOpenAI:
    """The pattern published for openai-python behind APIM: a static key, read once."""
    return openai.AzureOpenAI(
        base_url=base_url,
        api_key="placeholder",
        default_headers={HEADER: key},
        api_version=API_VERSION,
        max_retries=0,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_published_snippet_through_apimvault_survives_a_revoking_rotation(
    suffixed: LocalAzure, suffix: str, stream: bool
) -> None:
    azure = suffixed
    app = new_app_secret(azure)
    base_url = deployment_url(azure, suffix)
    static = published_snippet(base_url, app.subscription.primary_key)
    assert static.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices  # as published: works
    failures: list[BaseException] = []
    with SubscriptionKeyProvider(
        azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH
    ) as provider:
        client = create_azure_openai(provider, base_url=base_url, api_version=API_VERSION, max_retries=0)

        def call(_: int) -> None:
            try:
                if stream:
                    chunks = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
            except BaseException as exc:
                failures.append(exc)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(call, range(8)))
            rotate_to_secondary(azure, app)  # the key both clients started with is revoked
            list(pool.map(call, range(16)))
        # model does not route with a deployment-scoped base_url (as in openai): the URL's deployment answers
        raw = client.chat.completions.with_raw_response.create(model="any-name", messages=MESSAGES)
        assert raw.http_response.request.url.path.endswith(f"/deployments/{DEPLOYMENT}/chat/completions")
        assert raw.http_response.request.url.params["api-version"] == API_VERSION
        client.close()
        assert failures == []
        assert refusal_stats(provider).key_resends >= 1 and provider.stats().rotations == 1
    with pytest.raises(openai.AuthenticationError):  # the static snippet is what breaks on rotation
        static.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    static.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_async_published_snippet_through_apimvault_survives_a_revoking_rotation(
    suffixed: LocalAzure, loop: asyncio.Runner, suffix: str, stream: bool
) -> None:
    azure = suffixed
    app = new_app_secret(azure)
    base_url = deployment_url(azure, suffix)

    async def call(client: openai.AsyncAzureOpenAI) -> str:
        if stream:
            chunks = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        return reply.choices[0].message.content or ""

    async def run() -> tuple[list[Any], AsyncSubscriptionKeyProvider]:
        provider = AsyncSubscriptionKeyProvider(
            azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH
        )
        client = create_async_azure_openai(
            provider, base_url=base_url, api_version=API_VERSION, max_retries=0
        )
        before = await asyncio.gather(*[call(client) for _ in range(6)], return_exceptions=True)
        rotate_to_secondary(azure, app)
        after = await asyncio.gather(*[call(client) for _ in range(12)], return_exceptions=True)
        await client.close()
        await provider.close()
        return [*before, *after], provider

    results, provider = loop.run(run())
    assert [r for r in results if not isinstance(r, str) or not r] == []  # 0 failed calls
    assert refusal_stats(provider).key_resends >= 1 and provider.stats().rotations == 1


@pytest.mark.parametrize("api", ["sync", "async"])
def test_base_url_pins_its_origin_and_https(azure: LocalAzure, loop: asyncio.Runner, api: str) -> None:
    app = new_app_secret(azure)
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    factory: Any = create_azure_openai if api == "sync" else create_async_azure_openai
    provider = cls(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH)
    base_url = deployment_url(azure, "openai")
    with pytest.raises(InsecureTransportError, match="base_url"):
        factory(provider, base_url=base_url.replace("https://", "http://"), api_version=API_VERSION)
    client = factory(provider, base_url=base_url, api_version=API_VERSION, max_retries=0)
    elsewhere = client.with_options(base_url=f"{azure.vault_url}/openai/deployments/{DEPLOYMENT}")

    async def acall(c: Any) -> Any:
        return await c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)

    def call(c: Any) -> Any:
        return (
            c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            if api == "sync"
            else loop.run(acall(c))
        )

    assert call(client).choices
    with pytest.raises(InsecureTransportError, match="this client was made for"):
        call(elsewhere)
    result = client.close()
    if asyncio.iscoroutine(result):
        loop.run(result)
    result = provider.close()
    if asyncio.iscoroutine(result):
        loop.run(result)


def test_base_url_and_azure_endpoint_together_say_which_to_keep(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    with SubscriptionKeyProvider(azure.vault_url, app.name) as provider:
        with pytest.raises(ConfigurationError, match=r"not both: keep base_url .* or keep azure_endpoint"):
            create_azure_openai(
                provider, azure_endpoint=azure.gateway_url, base_url=deployment_url(azure, "openai")
            )
        assert provider.stats().vault_reads == 0


@pytest.mark.parametrize("name", [HEADER, "ocp-apim-subscription-key", "api-key", "X-Custom-Key"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_key_in_default_headers_is_a_typed_error_that_says_why(
    azure: LocalAzure, loop: asyncio.Runner, api: str, name: str
) -> None:
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    factory: Any = create_azure_openai if api == "sync" else create_async_azure_openai
    header = "X-Custom-Key" if name == "X-Custom-Key" else HEADER
    provider = cls(azure.vault_url, app.name, header_name=header)
    with pytest.raises(KeyInHeadersError, match="never rotate") as info:
        factory(
            provider, base_url=deployment_url(azure, "openai"), default_headers={name: key, "X-Trace": "1"}
        )
    assert isinstance(info.value, ConfigurationError)
    assert key not in str(info.value) and "Remove it from default_headers" in str(info.value)
    client = factory(provider, base_url=deployment_url(azure, "openai"), default_headers={"X-Trace": "1"})
    assert client.default_headers["X-Trace"] == "1"  # other headers are kept
    result = client.close()
    if asyncio.iscoroutine(result):
        loop.run(result)
    result = provider.close()
    if asyncio.iscoroutine(result):
        loop.run(result)


def _readme_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Coming from a static key\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_coming_from_a_static_key_runs_as_written(azure: LocalAzure) -> None:
    before, after = _readme_blocks()
    app = new_app_secret(azure)
    env: dict[str, str | None] = {
        "APIMVAULT_OPENAI_BASE_URL": deployment_url(azure, "openai"),
        "APIM_SUBSCRIPTION_KEY": app.subscription.primary_key,
        "APIMVAULT_SECRET_NAME": app.name,
    }
    with temporary_environ(env):
        published: dict[str, Any] = {}
        exec(compile(before, "README.md (published snippet)", "exec"), published)  # noqa: S102 - README text
        assert published["reply"].choices
        rotate_to_secondary(azure, app)  # the key the published snippet read once is revoked
        with pytest.raises(openai.AuthenticationError):
            published["client"].chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        published["client"].close()
        migrated: dict[str, Any] = {}
        exec(compile(after, "README.md (through apimvault)", "exec"), migrated)  # noqa: S102 - README text
        assert migrated["reply"].choices  # the same code through apimvault reads the key in force
        assert migrated["provider"].stats().credential_id == "secondary"
