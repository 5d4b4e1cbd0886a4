"""Tenants, API keys, scopes, limits, budgets and usage counters: the data plane's domain, no HTTP here."""
