"""Observability: OpenTelemetry traces, Prometheus metrics and structured JSON logs (config and errors only)."""
