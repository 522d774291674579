"""Serving web apps: the Python and asyncio clients (one core), the cache, and the OpenAI-compatible HTTP
gateway with its limits and metrics."""
