"""LangChain (``langchain-openai``): ``AzureChatOpenAI`` and ``AzureOpenAIEmbeddings`` on apimvault clients.

LangChain accepts ready openai clients, but only with an ``api_key`` set, and it builds whichever of the
sync / async clients it is not given from its own settings (``AZURE_OPENAI_ENDPOINT``,
``AZURE_OPENAI_API_KEY``), without apimvault's auth. These functions pass both halves (a missing half
refuses to send, with a :class:`~apimvault.exceptions.ConfigurationError`) and a placeholder ``api_key``
that is never sent, and return LangChain's own objects::

    llm = azure_chat_openai(create_azure_openai(provider), create_async_azure_openai(aprovider),
                            deployment="gpt-4o-mini")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._auth import PLACEHOLDER_API_KEY
from ._common import client_pair, refuse_credentials

if TYPE_CHECKING:
    import openai
    from langchain_openai import AzureChatOpenAI, AzureOpenAIEmbeddings

__all__ = ["azure_chat_openai", "azure_openai_embeddings"]

#: Keywords that would hand LangChain its own credential, endpoint or transport.
_REFUSED = (
    "api_key",
    "openai_api_key",
    "azure_ad_token",
    "azure_ad_token_provider",
    "azure_ad_async_token_provider",
    "azure_endpoint",
    "base_url",
    "openai_api_base",
    "http_client",
    "http_async_client",
    "client",
    "root_client",
    "async_client",
    "root_async_client",
    "default_headers",
)


def azure_chat_openai(
    client: openai.AzureOpenAI | None = None,
    async_client: openai.AsyncAzureOpenAI | None = None,
    *,
    deployment: str,
    **kwargs: Any,
) -> AzureChatOpenAI:
    """A ``langchain_openai.AzureChatOpenAI`` whose requests go through apimvault's clients.

    ``deployment`` is the Azure OpenAI deployment behind APIM. Other keyword arguments (``temperature``,
    ``streaming``, ``max_tokens``, ...) go to ``AzureChatOpenAI``; credentials, endpoints, transports and
    ``default_headers`` belong to the apimvault clients and are refused here.
    """
    from langchain_openai import AzureChatOpenAI
    from pydantic import SecretStr

    refuse_credentials("AzureChatOpenAI", kwargs, _REFUSED)
    sync, async_ = client_pair("AzureChatOpenAI", client, async_client)
    return AzureChatOpenAI(
        model=deployment,
        api_key=SecretStr(PLACEHOLDER_API_KEY),
        client=sync.chat.completions,
        root_client=sync,
        async_client=async_.chat.completions,
        root_async_client=async_,
        **kwargs,
    )


def azure_openai_embeddings(
    client: openai.AzureOpenAI | None = None,
    async_client: openai.AsyncAzureOpenAI | None = None,
    *,
    deployment: str,
    **kwargs: Any,
) -> AzureOpenAIEmbeddings:
    """A ``langchain_openai.AzureOpenAIEmbeddings`` whose requests go through apimvault's clients.

    ``check_embedding_ctx_length`` defaults to ``False`` here: with it on, LangChain tokenizes with
    tiktoken, which downloads its encoding files from the internet on first use.
    """
    from langchain_openai import AzureOpenAIEmbeddings
    from pydantic import SecretStr

    refuse_credentials("AzureOpenAIEmbeddings", kwargs, _REFUSED)
    sync, async_ = client_pair("AzureOpenAIEmbeddings", client, async_client)
    kwargs.setdefault("check_embedding_ctx_length", False)
    return AzureOpenAIEmbeddings(
        model=deployment,
        api_key=SecretStr(PLACEHOLDER_API_KEY),
        client=sync.embeddings,
        async_client=async_.embeddings,
        **kwargs,
    )
