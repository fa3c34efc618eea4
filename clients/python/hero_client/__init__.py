"""Python client for the hero-rewards service.

    from hero_client import HeroClient
    with HeroClient("http://127.0.0.1:8000") as client:
        result = client.score([{"prompt": "2+2?", "reference": "4",
                                "responses": ["\\\\boxed{4}", "\\\\boxed{5}"]}])
        result.groups[0].advantages
"""

from importlib import metadata as _metadata

from ._client import AsyncHeroClient, HeroClient
from ._errors import (
    HeroAPIError,
    HeroConnectionError,
    HeroError,
    HeroTimeoutError,
    HeroValidationError,
)
from ._retry import RetryPolicy
from ._sigma import RunningSigma
from .schema import (
    ChatMessage,
    GetRewardResponse,
    Group,
    GroupResult,
    HeroParams,
    InfoResponse,
    RewardsRequest,
    RewardsResponse,
)

try:
    __version__ = _metadata.version("hero-rewards")  # pip's, set once in pyproject.toml
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+src"

__all__ = [
    "__version__",
    "AsyncHeroClient",
    "ChatMessage",
    "GetRewardResponse",
    "Group",
    "GroupResult",
    "HeroAPIError",
    "HeroClient",
    "HeroConnectionError",
    "HeroError",
    "HeroParams",
    "HeroTimeoutError",
    "HeroValidationError",
    "InfoResponse",
    "RetryPolicy",
    "RewardsRequest",
    "RewardsResponse",
    "RunningSigma",
]
