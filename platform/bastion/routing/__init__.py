"""Routing: which profile (and later which replica) serves a request, and why."""
