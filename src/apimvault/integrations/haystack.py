"""Haystack (``haystack-ai``): ``AzureOpenAIChatGenerator`` on apimvault clients.

Haystack's Azure generators take no client: ``warm_up()`` builds their own ``AzureOpenAI`` /
``AsyncAzureOpenAI`` from settings (an ``api_key`` secret or an Entra token), which cannot carry a key that
rotates under APIM. :func:`azure_openai_chat_generator` makes the generator with a placeholder key that is
never sent and hands it apimvault's clients, so ``warm_up()`` has nothing to build::

    generator = azure_openai_chat_generator(create_azure_openai(provider),
                                            create_async_azure_openai(aprovider), deployment="gpt-4o-mini")

Close the apimvault clients, not the generator: ``generator.close()`` drops them, and a later
``warm_up()`` would build a client of Haystack's own that only carries the placeholder. ``to_dict()``
(and so pipeline serialization) refuses the placeholder secret: a reloaded generator would not have
apimvault's clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._auth import PLACEHOLDER_API_KEY
from ._common import client_pair, endpoint_of, refuse_credentials

if TYPE_CHECKING:
    import openai
    from haystack.components.generators.chat import AzureOpenAIChatGenerator

__all__ = ["azure_openai_chat_generator"]

_REFUSED = (
    "api_key",
    "azure_ad_token",
    "azure_ad_token_provider",
    "azure_endpoint",
    "azure_deployment",
    "http_client_kwargs",
    "default_headers",
)


def azure_openai_chat_generator(
    client: openai.AzureOpenAI | None = None,
    async_client: openai.AsyncAzureOpenAI | None = None,
    *,
    deployment: str,
    **kwargs: Any,
) -> AzureOpenAIChatGenerator:
    """A ``haystack`` ``AzureOpenAIChatGenerator`` whose ``run`` / ``run_async`` use apimvault's clients.

    ``deployment`` is the Azure OpenAI deployment behind APIM. Other keyword arguments
    (``generation_kwargs``, ``streaming_callback``, ``tools``, ...) go to the generator; credentials,
    the endpoint, transports and ``default_headers`` belong to the apimvault clients and are refused here.
    A client half not given refuses to send (:class:`~apimvault.exceptions.ConfigurationError`).
    """
    from haystack.components.generators.chat import AzureOpenAIChatGenerator
    from haystack.utils import Secret

    refuse_credentials("AzureOpenAIChatGenerator", kwargs, _REFUSED)
    sync, async_ = client_pair("AzureOpenAIChatGenerator", client, async_client)
    generator = AzureOpenAIChatGenerator(
        azure_endpoint=endpoint_of(sync),
        azure_deployment=deployment,
        api_key=Secret.from_token(PLACEHOLDER_API_KEY),
        azure_ad_token=None,
        **kwargs,
    )
    generator.client = sync
    generator.async_client = async_
    return generator
