"""Serving: the scheduler (continuous batching on the engine, on a thread of its own) and the HTTP API
over it (OpenAI- and SGLang-compatible)."""
