"""What the adapters share: checking the clients they are given and standing in for a missing half."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx2
import openai

from .._auth import PLACEHOLDER_API_KEY
from ..exceptions import ConfigurationError

__all__ = ["client_pair", "endpoint_of", "refuse_credentials"]


class _RefusingTransport(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """Sends nothing: every request raises a :class:`ConfigurationError` naming what to pass instead."""

    def __init__(self, message: str) -> None:
        self._message = message

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        raise ConfigurationError(self._message)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        raise ConfigurationError(self._message)


def endpoint_of(client: openai.AzureOpenAI | openai.AsyncAzureOpenAI) -> str:
    """The ``azure_endpoint`` a client was made with (its base URL less the ``/openai`` path)."""
    return str(client.base_url).rstrip("/").removesuffix("/openai")


def client_pair(
    framework: str, client: Any, async_client: Any
) -> tuple[openai.AzureOpenAI, openai.AsyncAzureOpenAI]:
    """Both halves a framework needs; the one not given is a client that refuses to send anything.

    Frameworks that hold a sync and an async client build whichever they are not given from their own
    settings, without apimvault's auth. A refusing stand-in keeps them from doing so: calling the missing
    half raises :class:`ConfigurationError` before any request leaves the process.
    """
    given = client if client is not None else async_client
    if given is None:
        raise ConfigurationError(
            f"{framework}: pass client=create_azure_openai(provider) and/or "
            "async_client=create_async_azure_openai(aprovider)"
        )
    if client is not None and not isinstance(client, openai.AzureOpenAI):
        raise ConfigurationError(
            f"{framework}: client must be an openai.AzureOpenAI from create_azure_openai, "
            f"not {type(client).__name__}"
        )
    if async_client is not None and not isinstance(async_client, openai.AsyncAzureOpenAI):
        raise ConfigurationError(
            f"{framework}: async_client must be an openai.AsyncAzureOpenAI from "
            f"create_async_azure_openai, not {type(async_client).__name__}"
        )
    base_url = str(given.base_url)
    if client is None:
        transport = _RefusingTransport(
            f"{framework} was built without a sync client: pass client=create_azure_openai(provider)"
        )
        client = openai.AzureOpenAI(
            base_url=base_url,
            api_key=PLACEHOLDER_API_KEY,
            api_version="unused",
            max_retries=0,
            http_client=httpx2.Client(transport=transport),
        )
    if async_client is None:
        transport = _RefusingTransport(
            f"{framework} was built without an async client: "
            "pass async_client=create_async_azure_openai(aprovider)"
        )
        async_client = openai.AsyncAzureOpenAI(
            base_url=base_url,
            api_key=PLACEHOLDER_API_KEY,
            api_version="unused",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=transport),
        )
    return client, async_client


def refuse_credentials(framework: str, kwargs: Mapping[str, Any], names: Iterable[str]) -> None:
    """A credential or endpoint keyword would make the framework build its own, unguarded client."""
    given = sorted(name for name in names if name in kwargs)
    if given:
        raise ConfigurationError(
            f"{framework}: {', '.join(given)} cannot be combined with apimvault clients "
            "(they carry the endpoint and the key)"
        )
