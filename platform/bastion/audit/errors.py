"""Audit errors: one readable line each, never a key or a piece of logged content."""

from bastion.errors import BastionError


class AuditError(BastionError):
    """The audit log cannot do what was asked (database, spool, export or verification)."""


class AuditKeyError(AuditError):
    """A signing or content key is missing, unreadable or malformed (the message never shows the key)."""
