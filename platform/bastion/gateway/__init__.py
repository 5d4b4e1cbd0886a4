"""The data plane: OpenAI-compatible API, auth, limits, routing and streaming relay in front of the engines."""
