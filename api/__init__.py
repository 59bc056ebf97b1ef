"""The aiohttp apps (admin API; the router comes later), the OpenAPI document, auth and the CLI."""
