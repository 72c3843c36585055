"""Adapters for frameworks that would otherwise rebuild their own openai client and drop apimvault's guard.

Each submodule imports its framework lazily (inside the function), so ``apimvault`` gains no dependency:
install the framework yourself (or ``apimvault[integrations]`` for the tested versions). Every adapter
takes clients made by :func:`apimvault.create_azure_openai` / :func:`apimvault.create_async_azure_openai`
and returns the framework's own object.

* :mod:`apimvault.integrations.langchain`: ``AzureChatOpenAI`` / ``AzureOpenAIEmbeddings``.
* :mod:`apimvault.integrations.haystack`: ``AzureOpenAIChatGenerator``.

Semantic Kernel, the OpenAI Agents SDK, Pydantic AI, Microsoft Agent Framework and LiteLLM take a ready
client as it is: see the README section "Use with your framework".
"""

from __future__ import annotations

__all__: list[str] = []
