"""The gateway's OpenAPI document, served at `/openapi.json`.

The inference routes read the raw body themselves (size limit, UTF-8, JSON, then the pydantic models in
`protocol.py`), so FastAPI cannot derive their request bodies: this module writes the document from the same
models. Every status a route can answer is declared with OpenAI's error body, so clients and schema-driven tests
(tests/integration/test_schemathesis.py) know each answer. Responses relayed from the engine are described
loosely (the engine's own OpenAI layer defines them); Bastion only promises their envelope.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bastion.gateway.protocol import ChatCompletionRequest, CompletionRequest, MessagesRequest

_REF = "#/components/schemas/{model}"
_ERROR_STATUSES = {
    "400": "Invalid request: body not JSON or not UTF-8, a field out of range, the context exceeded",
    "401": "Missing, unknown, expired or revoked API key",
    "403": "The key lacks the scope, the model or profile is not allowed, or the tenant is suspended",
    "404": "Unknown model",
    "413": "Body larger than gateway.max_body_bytes",
    "429": "A rate, token, concurrency or budget limit, or too many failed authentications from this address",
    "503": "No replica, the key store or the limiter is unavailable; retry after the Retry-After seconds",
}
_ENGINE_STATUSES = {
    "500": "The engine failed the request",
    "502": "The engine's answer could not be relayed",
}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
COMPLETION = {
    "type": "object",
    "required": ["object", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": ["object", "null"]},
    },
}
MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}
MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": MODEL,
        },
    },
}
ANTHROPIC_ERROR = {  # gateway/anthropic.py: every answer of /v1/messages that is an error has this shape
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
USAGE = {
    "type": "object",
    "required": ["object", "tenant", "data"],
    "properties": {
        "object": {"const": "usage"},
        "tenant": {"type": "string"},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "period"]}},
    },
}


def _errors(*statuses: str, model: str = "Error") -> dict[str, Any]:
    table = {**_ERROR_STATUSES, **_ENGINE_STATUSES}
    return {
        s: {"description": table[s], "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}}}
        for s in statuses
    }


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _inference(
    model: type[BaseModel],
    components: dict[str, Any],
    summary: str,
    example: dict[str, Any],
    error: str = "Error",
    security: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body = {"schema": _schema(model, components), "example": example}
    return {
        "post": {
            "summary": summary,
            "security": security or [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": body}},
            "responses": {
                "200": {
                    "description": "The engine's answer, or its server-sent events when `stream` is true",
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model="Completion")}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(*_ERROR_STATUSES, *_ENGINE_STATUSES, model=error),
            },
        }
    }


def document(example_model: str = "MODEL") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the policy-enforcing gateway (not of the benchmark's bare relay); the request
    examples name `example_model` (the platform's first model)."""
    chat = {"model": example_model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
    text = {"model": example_model, "prompt": "Once upon a time", "max_tokens": 16}
    components: dict[str, Any] = {
        "Error": ERROR,
        "Completion": COMPLETION,
        "ModelList": MODEL_LIST,
        "Model": MODEL,
        "Usage": USAGE,
        "AnthropicError": ANTHROPIC_ERROR,
    }
    messages = {"model": example_model, "max_tokens": 16, "messages": [{"role": "user", "content": "Hello"}]}
    paths: dict[str, Any] = {
        "/v1/chat/completions": _inference(ChatCompletionRequest, components, "OpenAI chat completions", chat),
        "/v1/completions": _inference(CompletionRequest, components, "OpenAI text completions", text),
        "/v1/messages": _inference(
            MessagesRequest,
            components,
            "Anthropic Messages (the key as `x-api-key` or a bearer token); errors in Anthropic's shape",
            messages,
            error="AnthropicError",
            security=[{"bearer": []}, {"apiKey": []}],
        ),
        "/v1/models": {
            "get": {
                "summary": "The models (and model@profile aliases) this key may use",
                "security": [{"bearer": []}],
                "responses": {
                    "200": {
                        "description": "Model list",
                        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ModelList")}}},
                    },
                    **_errors("401", "403", "429", "503"),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model (or model@profile alias) this key may use; 404 for any other name",
                "security": [{"bearer": []}],
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "The model",
                        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Model")}}},
                    },
                    **_errors("401", "403", "404", "429", "503"),
                },
            }
        },
        "/v1/usage": {
            "get": {
                "summary": "The tenant's usage counters per period, model and profile (scope usage:read)",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "period",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}(-\d{2})?$"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "Usage buckets",
                        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Usage")}}},
                    },
                    **_errors("400", "401", "403", "429", "503"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": {
                        "description": "Alive",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"type": "string"}},
                                }
                            }
                        },
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Bastion gateway", "version": "1", "description": "OpenAI-compatible, tenant-aware."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "bst_... API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "bst_... API key"},
            },
        },
    }
