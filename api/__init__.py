"""The HTTP side: the admin API (aiohttp), the OpenAI router (asyncio protocols + httptools, for
its hot path), the OpenAPI document, auth and the CLI."""
