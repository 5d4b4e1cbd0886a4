"""Bastion: an on-premise LLM serving platform with tenant-aware gateway, audit and MTP speculation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bastion")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
