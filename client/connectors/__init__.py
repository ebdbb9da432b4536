"""Connectors that inference engines load by module path, with no engine patch:
``lmcache`` (LMCache's remote-storage plugin). Each imports its engine only when
the engine loads it."""
