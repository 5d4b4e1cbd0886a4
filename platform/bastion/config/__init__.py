"""Platform file (YAML, strict) and process settings (env BASTION_*)."""

from bastion.config.loader import Settings, format_errors, is_production, load_config
from bastion.config.schema import DEEP_CONTEXT, FAST_AGENTIC, PlatformConfig

__all__ = [
    "DEEP_CONTEXT",
    "FAST_AGENTIC",
    "PlatformConfig",
    "Settings",
    "format_errors",
    "is_production",
    "load_config",
]
