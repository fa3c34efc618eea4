"""The v1 wire contract: the one definition shared by the service and the client.

Field names here are the contract (see DESIGN §2): fields may be added, never renamed.
Request models reject unknown fields so a typo is an error, not a silently ignored option;
response models accept unknown fields so an older client can read a newer server.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from . import hero
from .vocabulary import (
    AdvantageKind,
    ChatRole,
    DisagreementKind,
    Mode,
    TiePolicy,
    VerifierName,
    VerifierStatus,
    WeightGap,
)

API_VERSION = "v1"

# Bounds that keep every reward finite (min-max ranges, std and w * advantage cannot overflow).
MAX_ABS_RM_SCORE = 1e9
MAX_WEIGHT = 1e3
MAX_K = 1e3


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)
# What the docs (OpenAPI) advertise for ``content``: a string or OpenAI-style text parts.
_CONTENT_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "additionalProperties": False}},
]}


def join_text_parts(parts: list[Any]) -> str:
    """OpenAI-style ``[{"type": "text", "text": ...}, ...]`` content as one string, the parts joined
    by newlines (as vLLM's chat handling does). Other part types (images, audio) cannot be scored
    by a text reward model, so they are refused rather than dropped."""
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"type {kind!r}" if kind is not None else f"a {type(part).__name__}"
            raise ValueError(f"content part [{i}] is {what}: only text parts "
                             "{\"type\": \"text\", \"text\": ...} can be scored")
        text = part.get("text")
        if not isinstance(text, str) or set(part) - {"type", "text"}:
            raise ValueError(f"content part [{i}] must be exactly {{\"type\": \"text\", "
                             "\"text\": <string>}")
        texts.append(text)
    return "\n".join(texts)


class ChatMessage(_Request):
    """One chat turn. ``content``: a string, or a list of text parts (joined by newlines)."""

    role: ChatRole
    content: Annotated[str, WithJsonSchema(_CONTENT_SCHEMA)]

    @field_validator("role", mode="before")
    @classmethod
    def _supported_role(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in CHAT_ROLES:
            raise ValueError(
                f"role {v!r} is not supported: use 'system', 'user' or 'assistant' (tool and "
                "function turns cannot be scored; put their text in a user turn)")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            return join_text_parts(v)
        if not isinstance(v, str):
            got = "null" if v is None else type(v).__name__
            raise ValueError(f"content must be a string or a list of text parts, got {got}")
        return v


def _prompt_kind(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list[ChatMessage]"
    return None


# A string or chat messages. The discriminator picks the branch by the JSON type, so a bad chat
# message gets that message's error, not pydantic's "or it should have been a string" noise. The
# tag names are the ones field paths already skip (hero_client._validation.field_path).
Prompt = Annotated[
    Union[Annotated[str, Tag("str")], Annotated[list[ChatMessage], Tag("list[ChatMessage]")]],
    Discriminator(_prompt_kind, custom_error_type="prompt_type",
                  custom_error_message="prompt must be a string or a list of chat messages "
                                       "[{\"role\": ..., \"content\": ...}]"),
]


def _check_scores(values: list[float] | None, what: str) -> list[float] | None:
    if values is not None:
        for i, v in enumerate(values):
            if not math.isfinite(v) or abs(v) > MAX_ABS_RM_SCORE:
                raise ValueError(
                    f"{what}[{i}] must be a finite number within ±{MAX_ABS_RM_SCORE:g}, got {v}")
    return values


class HeroParams(_Request):
    """Eq. 3-5 hyper-parameters. Defaults: the paper's appendix (alpha = beta = 0.1 for
    mixed/hard data; 0.05 is the paper's choice for easy-to-verify data)."""

    alpha: float = Field(0.1, ge=0.0,
                         description="half-width of the incorrect band [-alpha, alpha]")
    beta: float = Field(0.1, ge=0.0, description="half-width of the correct band [1-beta, 1+beta]")
    w_min: float = Field(0.4, ge=0.0, le=MAX_WEIGHT)
    w_max: float = Field(3.0, ge=0.0, le=MAX_WEIGHT)
    k: float = Field(6.0, ge=0.0, le=MAX_K, description="sigmoid sharpness of the variance weight")
    epsilon: float = Field(1e-6, gt=0.0, le=1.0, description="min-max denominator guard")
    sigma_ref: Optional[float] = Field(
        None, ge=0.0, le=MAX_ABS_RM_SCORE,
        description="running mean of group sigma; default: mean sigma of this request"
    )
    advantage: AdvantageKind = "grpo"
    tie_policy: TiePolicy = "bottom"
    weight_gap: WeightGap = "absolute"

    @field_validator("alpha", "beta", "w_min", "w_max", "k", "epsilon", "sigma_ref")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def formula_params(self) -> hero.HeroParams:
        """The hyper-parameters of :func:`hero_client.hero.score_group` (all but sigma_ref)."""
        return hero.HeroParams(
            alpha=self.alpha, beta=self.beta, w_min=self.w_min, w_max=self.w_max, k=self.k,
            epsilon=self.epsilon, tie_policy=self.tie_policy, weight_gap=self.weight_gap,
            advantage=self.advantage)

    @model_validator(mode="after")
    def _consistent(self) -> HeroParams:
        if self.alpha + self.beta >= 1.0:
            raise ValueError(
                "alpha + beta must be < 1 so the incorrect band [-alpha, alpha] stays below "
                "the correct band [1-beta, 1+beta]"
            )
        if self.w_min > self.w_max:
            raise ValueError("w_min must be <= w_max")
        return self


class Group(_Request):
    """One prompt with its N sampled responses."""

    id: Optional[str] = Field(None, description="client id, echoed back; default: the index")
    prompt: Prompt = ""
    reference: Optional[str] = Field(None,
                                     description="gold answer; required by math/exact/numeric")
    responses: list[str] = Field(..., min_length=1)
    rm_scores: Optional[list[float]] = Field(
        None, description="bring your own RM scores (one per response); skips the service's RM"
    )
    group_key: Optional[str] = Field(
        None, min_length=1, max_length=256, description="this group is a piece of a larger "
        "one: pieces with the same key (and group_size) are scored as one group")
    group_size: Optional[int] = Field(
        None, ge=1, description="the whole group's size N (with group_key)")

    @field_validator("rm_scores")
    @classmethod
    def _finite_scores(cls, v: list[float] | None) -> list[float] | None:
        return _check_scores(v, "rm_scores")

    @property
    def is_piece(self) -> bool:
        """A piece of a larger group, assembled by the service with the other pieces."""
        return self.group_key is not None

    @model_validator(mode="after")
    def _scores_match(self) -> Group:
        if self.rm_scores is not None and len(self.rm_scores) != len(self.responses):
            raise ValueError(
                f"rm_scores has {len(self.rm_scores)} values for {len(self.responses)} responses"
            )
        if (self.group_key is None) != (self.group_size is None):
            raise ValueError("group_key and group_size come together (a piece of a group "
                             "names its group and the group's size), or neither")
        if self.group_size is not None and self.group_size < len(self.responses):
            raise ValueError(f"group_size {self.group_size} is smaller than this piece's "
                             f"{len(self.responses)} responses")
        return self


class RewardsRequest(_Request):
    request_id: Optional[str] = None
    mode: Mode = "hero"
    verifier: Optional[VerifierName] = Field(None, description="default: the server's --verifier")
    params: HeroParams = Field(default_factory=HeroParams)
    groups: list[Group] = Field(..., min_length=1)


class GroupResult(_Response):
    id: str
    sigma: Optional[float] = Field(None, description="population std of the raw RM scores")
    weight: float
    rewards: list[float]
    advantages: Optional[list[float]] = None
    verified: list[bool]
    verifier_status: list[VerifierStatus]
    rm_scores: Optional[list[float]] = None
    normalized: list[float]
    truncated: list[bool]
    partial: bool = Field(
        False, description="group assembly timed out before the group was complete")
    disagreement: Optional[list[Optional[DisagreementKind]]] = Field(
        None, description="one per response: null, or where the verifier and the RM disagree "
        "(likely_false_negative: rejected, but scored like the verified answers; "
        "likely_false_positive: verified, but scored like the rejected ones); null as a whole "
        "without RM scores (see hero_client.diagnostics)")


class Timings(_Response):
    queue: float = 0.0
    verifier: float = 0.0
    reward_model: float = 0.0
    total: float = 0.0


class RewardsResponse(_Response):
    request_id: Optional[str] = None
    mode: Mode
    reward_model: str
    verifier: VerifierName
    sigma_ref: Optional[float] = None
    groups: list[GroupResult]
    timings_ms: Timings = Field(default_factory=Timings)


def _label_text(value: Any) -> Any:
    """OpenRLHF posts its dataset's label column as it is, so a numeric answer arrives as a JSON
    number: it is the reference's text (42 -> "42", 0.5 -> "0.5", 42.0 -> "42")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError("a boolean is not an answer: send the label as a string or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        # Integral floats (a pandas int column with gaps reads as float) as integers, so the
        # exact verifier compares "42" with "42", not "42.0".
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    raise ValueError(f"must be a string or a number, got {type(value).__name__}")


class GetRewardRequest(BaseModel):
    """OpenRLHF remote-RM payload. Extra keys OpenRLHF versions add are ignored. An empty
    ``query`` list is a valid request with an empty answer."""

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: Optional[list[str]] = None
    labels: Optional[list[Annotated[Optional[str], BeforeValidator(_label_text)]]] = Field(
        None, description="one per query: the reference answer, a string or a JSON number "
                          "(42 -> \"42\"); the verifiers that need a reference refuse a blank one")

    @model_validator(mode="after")
    def _lengths(self) -> GetRewardRequest:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} items for {len(self.query)} queries")
        return self


class GetRewardResponse(_Response):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class FieldError(_Response):
    field: str
    message: str


class ErrorDetail(_Response):
    code: str
    message: str
    field: Optional[str] = None
    errors: Optional[list[FieldError]] = Field(
        None, description="422: every problem found, each with its field (``field``/``message`` "
                          "above: the first one, and a summary)")


class ErrorResponse(_Response):
    error: ErrorDetail


class LimitsInfo(_Response):
    max_body_bytes: int
    max_groups: int
    max_responses_per_group: int
    max_response_chars: int
    max_queued_rollouts: int


class InfoResponse(_Response):
    name: str = "hero-rewards"
    version: str
    api_version: str = API_VERSION
    reward_model: str
    verifier: VerifierName
    verifiers: list[VerifierName]
    modes: list[Mode]
    group_size: Optional[int] = None
    limits: LimitsInfo
    running_sigma_ref: dict[str, float] = Field(
        default_factory=dict, description="the server-side running sigma-bar per run "
        "(/get_reward ?run=, 'default' when unnamed), shared by replicas on one group store")
    group_store: Optional[str] = Field(None, description="memory | redis")
