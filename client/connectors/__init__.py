"""Connectors that inference engines load by module path, with no engine patch:
``lmcache`` (LMCache's remote-storage plugin), ``sglang`` (an SGLang HiCache
storage backend), ``vllm`` (a vLLM KV connector and a tier of vLLM's offloading).
Each imports its engine only when the engine loads it.

``SETTINGS`` are the SDK settings every connector accepts from its engine's
configuration; any left out come from the ``KVSTORE_*`` variables
(``ClientConfig.load``), then the SDK's defaults.
"""

from __future__ import annotations

from typing import Any, Mapping

SETTINGS = ("endpoints", "tenant", "subtenant", "durability", "token", "timeout", "attempt_timeout", "transport")


def client_settings(mapping: Mapping[str, Any] | None, names: tuple[str, ...] = SETTINGS) -> dict[str, Any]:
    """The entries of ``mapping`` named in ``names`` that have a value."""
    return {name: value for name, value in (mapping or {}).items() if name in names and value not in (None, "")}
