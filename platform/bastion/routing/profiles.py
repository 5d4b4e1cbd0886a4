"""Profile selection: explicit alias or header, else the tenant's default, else automatic; then overflow.

Automatic rules (ARCHITECTURE.md): a request whose prompt plus max_tokens exceeds the fast profile's context
goes deep; tool calls and short prompts go fast; other long prompts go deep. When the chosen upstream is
saturated (its in-flight count has reached max_ongoing_requests) a request that was not pinned explicitly
overflows to another profile it fits in; otherwise it is refused with a reason the client can read.
Pure logic: the caller supplies upstreams and in-flight counts, so this is testable without the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from bastion.config.schema import DEEP_CONTEXT, FAST_AGENTIC

PROFILE_SEPARATOR = "@"


class Candidate(Protocol):
    """What routing needs to know of an upstream (the gateway's UpstreamInfo has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def profile(self) -> str: ...
    @property
    def max_context(self) -> int: ...
    @property
    def max_ongoing_requests(self) -> int: ...


@dataclass(frozen=True)
class RoutingPolicy:
    fast_profile: str = FAST_AGENTIC
    deep_profile: str = DEEP_CONTEXT
    short_prompt_tokens: int = 4096  # at most this many prompt tokens counts as "short" (and at most half fast)


@dataclass(frozen=True)
class RouteRequest:
    model: str  # the base model name, alias removed
    prompt_tokens: int
    max_tokens: int | None
    has_tools: bool = False
    explicit_profile: str | None = None
    explicit_source: str | None = None  # "alias" | "header"
    tenant_default: str | None = None
    allowed_profiles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RoutingDecision:
    profile: str
    upstream: str
    reason: str
    max_context: int
    overflow_from: str | None = None


class RoutingError(Exception):
    """A request routing cannot place; `status` and `code` map onto an OpenAI error response."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, profile: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.profile = profile  # the profile that was full (429s): the gateway may queue the request for it
        self.retry_after = 1  # seconds, for a 429


def split_model(name: str) -> tuple[str, str | None]:
    """`NAME@profile` → (NAME, profile); a plain NAME → (NAME, None)."""
    base, sep, profile = name.partition(PROFILE_SEPARATOR)
    return (base, profile or None) if sep else (name, None)


def fits(c: Candidate, prompt_tokens: int, max_tokens: int | None) -> bool:
    return prompt_tokens + max(max_tokens or 0, 1) <= c.max_context


def _context_error(c: Candidate, req: RouteRequest) -> RoutingError:
    wanted = f"{req.prompt_tokens} in the prompt"
    if req.max_tokens is not None:
        wanted += f" + {req.max_tokens} for the completion (max_tokens)"
    return RoutingError(
        400,
        "context_length_exceeded",
        f"This model's maximum context length is {c.max_context} tokens (profile {c.profile}); "
        f"the request needs {wanted}. Shorten the prompt or lower max_tokens.",
        "max_tokens" if req.max_tokens is not None and req.prompt_tokens < c.max_context else "messages",
    )


def _automatic(usable: dict[str, Candidate], req: RouteRequest, policy: RoutingPolicy) -> tuple[Candidate, str]:
    fast = usable.get(policy.fast_profile)
    deep = usable.get(policy.deep_profile)
    if fast is not None and fits(fast, req.prompt_tokens, req.max_tokens):
        short = req.prompt_tokens <= min(policy.short_prompt_tokens, fast.max_context // 2)
        if req.has_tools:
            return fast, "auto:tools"
        if short or deep is None or not fits(deep, req.prompt_tokens, req.max_tokens):
            return fast, "auto:short_prompt" if short else "auto:only_fit"
        return deep, "auto:long_prompt"
    if deep is not None and fits(deep, req.prompt_tokens, req.max_tokens):
        return deep, "auto:context" if fast is not None else "auto:only_profile"
    others = [c for p, c in sorted(usable.items()) if fits(c, req.prompt_tokens, req.max_tokens)]
    if others:
        return others[0], "auto:only_fit"
    raise _context_error(max(usable.values(), key=lambda c: c.max_context), req)


def choose(
    req: RouteRequest,
    upstreams: Sequence[Candidate],
    in_flight: Mapping[str, int],
    policy: RoutingPolicy = RoutingPolicy(),
) -> RoutingDecision:
    def load(c: Candidate) -> float:
        return in_flight.get(c.name, 0) / c.max_ongoing_requests

    def saturated(c: Candidate) -> bool:
        return in_flight.get(c.name, 0) >= c.max_ongoing_requests

    by_profile: dict[str, Candidate] = {}
    for c in upstreams:  # several upstreams for one profile: the least loaded stands for it
        if c.model == req.model and (c.profile not in by_profile or load(c) < load(by_profile[c.profile])):
            by_profile[c.profile] = c
    if not by_profile:
        raise RoutingError(404, "model_not_found", f"The model `{req.model}` does not exist", "model")
    usable = {p: c for p, c in by_profile.items() if not req.allowed_profiles or p in req.allowed_profiles}

    if req.explicit_profile is not None:
        via = req.explicit_source or "alias"
        chosen = by_profile.get(req.explicit_profile)
        if chosen is None:
            raise RoutingError(
                404,
                "model_not_found",
                f"The model `{req.model}` is not served with profile `{req.explicit_profile}`",
                "model",
            )
        if req.explicit_profile not in usable:
            raise RoutingError(403, "profile_not_allowed", f"Profile `{req.explicit_profile}` is not allowed for you")
        if not fits(chosen, req.prompt_tokens, req.max_tokens):
            raise _context_error(chosen, req)
        if saturated(chosen):
            raise RoutingError(
                429,
                "profile_saturated",
                f"Profile `{chosen.profile}` is at capacity ({chosen.max_ongoing_requests} requests in flight) and "
                f"was requested explicitly; retry shortly or let Bastion choose the profile",
                profile=chosen.profile,
            )
        return RoutingDecision(chosen.profile, chosen.name, f"explicit:{via}", chosen.max_context)

    if not usable:
        raise RoutingError(403, "profile_not_allowed", f"No profile serving `{req.model}` is allowed for you")
    default = usable.get(req.tenant_default) if req.tenant_default else None
    if default is not None and fits(default, req.prompt_tokens, req.max_tokens):
        chosen, reason = default, "tenant_default"
    else:
        chosen, reason = _automatic(usable, req, policy)
    if not saturated(chosen):
        return RoutingDecision(chosen.profile, chosen.name, reason, chosen.max_context)
    spare = [
        c
        for c in usable.values()
        if c is not chosen and not saturated(c) and fits(c, req.prompt_tokens, req.max_tokens)
    ]
    if spare:
        other = min(spare, key=load)
        return RoutingDecision(other.profile, other.name, f"{reason}+overflow", other.max_context, chosen.profile)
    raise RoutingError(
        429,
        "capacity_exhausted",
        f"Every profile that can serve this request is at capacity (wanted `{chosen.profile}`); retry shortly",
        profile=chosen.profile,
    )
