"""The HTTP server over one loaded Model (app.py), with the Anthropic Messages API's translation (anthropic_api.py)."""
