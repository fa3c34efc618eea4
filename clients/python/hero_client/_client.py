"""Sync and async clients for the hero-rewards service.

Both share request building, chunking and merging (pure functions below); they differ only in how
they send. Large batches are split into requests of bounded size, sent with bounded concurrency,
retried on 429/503/connection errors (honouring Retry-After), and merged back in order. Pass
``transport=`` (e.g. ``httpx.MockTransport``) to swap the network out in tests.

Groups and params given as dicts are checked before anything is sent; a bad one raises
:class:`HeroValidationError` (a :class:`HeroAPIError` with status 422, the field named as the
server would name it, e.g. ``groups[3].prompt[0].role``, and ``errors`` listing every problem)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypedDict, TypeGuard, TypeVar, Union

import httpx
from pydantic import BaseModel, ValidationError

from . import hero
from ._errors import HeroConnectionError, HeroTimeoutError, HeroValidationError
from ._retry import RETRY_STATUSES, RetryPolicy, api_error, retry_after_seconds
from ._sigma import RunningSigma
from ._transport import HTTPBackend, aiohttp_transport, httpx_limits, resolve_backend
from ._validation import FieldProblem
from .schema import (
    GetRewardResponse,
    Group,
    HeroParams,
    InfoResponse,
    Mode,
    RewardsRequest,
    RewardsResponse,
    Timings,
    VerifierName,
)

DEFAULT_URL = "http://127.0.0.1:8000"
GroupLike = Union[Group, Mapping[str, Any]]
ParamsLike = Union[HeroParams, Mapping[str, Any], None]
_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], value: Any, at: str) -> _Model:
    """``value`` as ``model``, or a :class:`HeroValidationError` naming the field the way the
    server's 422 would (``groups[3].responses[0]``), instead of a raw pydantic error."""
    if isinstance(value, model):
        return value
    if not isinstance(value, Mapping):
        raise HeroValidationError([FieldProblem(
            field=at, message=f"must be a mapping or a {model.__name__}, got "
                              f"{type(value).__name__}")])
    try:
        return model.model_validate(dict(value))
    except ValidationError as exc:
        raise HeroValidationError.from_pydantic(exc.errors(), at) from None


def _as_groups(groups: Iterable[GroupLike]) -> list[Group]:
    if isinstance(groups, (str, bytes, Mapping)):
        raise HeroValidationError([FieldProblem(
            field="groups", message="must be a list of groups (a mapping is one group: wrap it "
                                    "in a list)")])
    return [_validated(Group, group, f"groups[{i}]") for i, group in enumerate(groups)]


def _as_params(params: ParamsLike, sigma_ref: Optional[float]) -> HeroParams:
    base = HeroParams() if params is None else _validated(HeroParams, params, "params")
    if sigma_ref is not None and base.sigma_ref is None:
        base = _validated(HeroParams, {**base.model_dump(exclude_unset=True),
                                       "sigma_ref": sigma_ref}, "params")
    return base


def chunk_groups(groups: Sequence[Group], max_groups: int, max_rollouts: int) -> list[list[Group]]:
    """Consecutive chunks with at most ``max_groups`` groups and ``max_rollouts`` responses
    (a group larger than ``max_rollouts`` travels alone: groups are never split)."""
    chunks: list[list[Group]] = []
    current: list[Group] = []
    rollouts = 0
    for group in groups:
        n = len(group.responses)
        if current and (len(current) >= max_groups or rollouts + n > max_rollouts):
            chunks.append(current)
            current, rollouts = [], 0
        current.append(group)
        rollouts += n
    if current:
        chunks.append(current)
    return chunks


def merge_responses(parts: Sequence[RewardsResponse], request_id: Optional[str]) -> RewardsResponse:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return RewardsResponse(
        request_id=request_id,
        mode=first.mode,
        reward_model=first.reward_model,
        verifier=first.verifier,
        sigma_ref=first.sigma_ref,
        groups=[g for part in parts for g in part.groups],
        timings_ms=Timings(
            queue=max(p.timings_ms.queue for p in parts),
            verifier=max(p.timings_ms.verifier for p in parts),
            reward_model=max(p.timings_ms.reward_model for p in parts),
            total=max(p.timings_ms.total for p in parts),
        ),
    )


def _has_pieces(groups: Sequence[Group]) -> bool:
    return any(g.is_piece for g in groups)


def weighted_as_one_batch(merged: RewardsResponse, groups: Sequence[Group],
                          params: HeroParams) -> RewardsResponse:
    """A batch split into several requests, weighted as if it had been sent as one.

    Without a sigma_ref each request is weighted with the mean sigma of its own groups (the
    first batch of a run, before any sigma-bar exists); one request for the whole batch would
    use the whole batch's mean. Verdicts, RM scores, sigma and the normalised rewards do not
    depend on sigma_ref, so the weights (and rewards, advantages) are recomputed here with the
    batch's mean by the same pure function the service uses. Pieces (weighted with the
    service's sigma-bar) and an explicit sigma_ref are left as they are."""
    if merged.mode != "hero" or params.sigma_ref is not None or _has_pieces(groups):
        return merged
    batch_ref = hero.default_sigma_ref([g.sigma for g in merged.groups])
    if batch_ref is None:
        return merged
    formula = params.formula_params()
    regrouped = []
    for result in merged.groups:
        if result.rm_scores is None:
            regrouped.append(result)
            continue
        scored = hero.score_group("hero", result.verified, result.rm_scores, formula, batch_ref)
        regrouped.append(result.model_copy(update={
            "weight": scored.weight, "rewards": scored.rewards, "advantages": scored.advantages}))
    return merged.model_copy(update={"groups": regrouped, "sigma_ref": batch_ref})


def get_reward_body(query: Sequence[str], prompts: Optional[Sequence[str]],
                    labels: Optional[Sequence[Optional[str]]]) -> dict[str, Any]:
    """The ``/get_reward`` request body (OpenRLHF's remote-RM protocol) for these queries."""
    return {"query": list(query), "prompts": list(prompts) if prompts is not None else None,
            "labels": list(labels) if labels is not None else None}


@dataclass(frozen=True)
class _Call(Generic[_Model]):
    """One endpoint call without its I/O: what to send and what model reads the answer. As in
    httpx, building a request is shared and only sending differs between the two clients."""

    method: str
    path: str
    answer: type[_Model]
    json: Any = None
    query: Optional[Mapping[str, str]] = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def parse(self, response: httpx.Response) -> _Model:
        return self.answer.model_validate_json(response.content)


def _rewards_call(request: RewardsRequest, run: Optional[str]) -> _Call[RewardsResponse]:
    return _Call("POST", "/v1/rewards", RewardsResponse,
                 request.model_dump(mode="json", exclude_none=True),
                 None if run is None else {"run": run})


def _get_reward_call(query: Sequence[str], prompts: Optional[Sequence[str]],
                     labels: Optional[Sequence[Optional[str]]]) -> _Call[GetRewardResponse]:
    return _Call("POST", "/get_reward", GetRewardResponse, get_reward_body(query, prompts, labels))


_INFO_CALL = _Call("GET", "/v1/info", InfoResponse)


def _succeeded(outcome: httpx.Response | Exception) -> TypeGuard[httpx.Response]:
    return isinstance(outcome, httpx.Response) and outcome.status_code < 400


class _HTTPSettings(TypedDict):
    """What the sync and the async ``httpx`` client are both built with."""

    base_url: str
    headers: dict[str, str]
    timeout: httpx.Timeout


class _ClientBase:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: Optional[str] = None,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        max_groups_per_request: int = 64,
        max_rollouts_per_request: int = 1024,
        max_concurrency: int = 4,
        running_sigma: Optional[RunningSigma] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.max_groups_per_request = max_groups_per_request
        self.max_rollouts_per_request = max_rollouts_per_request
        self.max_concurrency = max(1, max_concurrency)
        self.running_sigma = running_sigma
        self._http_settings = _HTTPSettings(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def _plan(
        self, groups: Iterable[GroupLike], mode: Mode, verifier: Optional[VerifierName],
        params: ParamsLike, sigma_ref: Optional[float], request_id: Optional[str],
    ) -> list[RewardsRequest]:
        checked = _as_groups(groups)
        # Pieces are weighted with the service's sigma-bar of their run (it sees the whole
        # group; this process sees a part): the client's own sigma-bar is not sent with them.
        if sigma_ref is None and self.running_sigma is not None and not _has_pieces(checked):
            sigma_ref = self.running_sigma.value
        resolved = _as_params(params, sigma_ref)
        chunks = chunk_groups(checked, self.max_groups_per_request, self.max_rollouts_per_request)
        if not chunks:
            raise HeroValidationError([FieldProblem(
                field="groups", message="score() needs at least one group")])
        try:
            return [
                RewardsRequest(
                    request_id=request_id if len(chunks) == 1 or request_id is None
                    else f"{request_id}/{i}",
                    mode=mode, verifier=verifier, params=resolved, groups=chunk)
                for i, chunk in enumerate(chunks)
            ]
        except ValidationError as exc:  # mode / verifier / request_id
            raise HeroValidationError.from_pydantic(exc.errors()) from None

    def _finish(self, requests: Sequence[RewardsRequest], parts: Sequence[RewardsResponse],
                request_id: Optional[str]) -> RewardsResponse:
        merged = merge_responses(parts, request_id)
        sent = [g for r in requests for g in r.groups]
        if len(parts) > 1:
            merged = weighted_as_one_batch(merged, sent, requests[0].params)
        if self.running_sigma is not None:
            self.running_sigma.update(
                g.sigma for g, group in zip(merged.groups, sent) if not group.is_piece)
        return merged

    def _retry_delay(self, call: _Call[Any], attempt: int,
                     outcome: httpx.Response | Exception) -> float:
        """Seconds to wait before retrying ``outcome`` of attempt ``attempt``, or raise: the
        final error when retries are spent, or at once for errors not worth retrying."""
        last = attempt >= self.retry.max_attempts
        if isinstance(outcome, httpx.TimeoutException):
            if last:
                raise HeroTimeoutError(f"{call}: no answer in time") from outcome
            return self.retry.delay(attempt)
        if isinstance(outcome, httpx.TransportError):
            if last:
                raise HeroConnectionError(f"{call}: {outcome}") from outcome
            return self.retry.delay(attempt)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome.status_code in RETRY_STATUSES and not last:
            return self.retry.delay(attempt, retry_after_seconds(outcome))
        raise api_error(outcome)


class HeroClient(_ClientBase):
    """Blocking client. Thread-safe; chunks of one call are sent from a small thread pool."""

    def __init__(self, base_url: str = DEFAULT_URL, *,
                 transport: Optional[httpx.BaseTransport] = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(transport=transport, **self._http_settings)

    def __enter__(self) -> HeroClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[_Model]) -> _Model:
        for attempt in range(1, self.retry.max_attempts + 1):
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request(call.method, call.path, json=call.json,
                                             params=call.query)
            except httpx.TransportError as exc:
                outcome = exc
            if _succeeded(outcome):
                return call.parse(outcome)
            time.sleep(self._retry_delay(call, attempt, outcome))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _post_rewards(self, request: RewardsRequest, run: Optional[str] = None) -> RewardsResponse:
        return self._send(_rewards_call(request, run))

    def score(
        self,
        groups: Iterable[GroupLike],
        *,
        mode: Mode = "hero",
        verifier: Optional[VerifierName] = None,
        params: ParamsLike = None,
        sigma_ref: Optional[float] = None,
        request_id: Optional[str] = None,
        run: Optional[str] = None,
    ) -> RewardsResponse:
        """Score groups (any number: they are chunked). ``sigma_ref`` defaults to the client's
        running sigma, if it has one. Groups with ``group_key`` + ``group_size`` are pieces of
        a group the service assembles across requests (and replicas); ``run`` names the
        server-side sigma-bar series they are weighted with (default ``default``)."""
        requests = self._plan(groups, mode, verifier, params, sigma_ref, request_id)
        if len(requests) == 1:
            parts = [self._post_rewards(requests[0], run)]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
                parts = list(pool.map(lambda r: self._post_rewards(r, run), requests))
        return self._finish(requests, parts, request_id)

    def get_reward(self, query: Sequence[str], prompts: Optional[Sequence[str]] = None,
                   labels: Optional[Sequence[Optional[str]]] = None) -> GetRewardResponse:
        return self._send(_get_reward_call(query, prompts, labels))

    def info(self) -> InfoResponse:
        return self._send(_INFO_CALL)

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncHeroClient(_ClientBase):
    """asyncio client; chunks of one call run concurrently, at most ``max_concurrency``.

    ``max_connections`` caps the connections it opens (None: no cap, for callers that keep a
    request per sample open while their groups assemble). ``http_backend``: ``"auto"`` sends
    through aiohttp's connection pool when ``httpx-aiohttp`` is installed (the ``aiohttp``
    extra; much less CPU per request with many requests in flight, see ``_transport.py``),
    else through httpx's; ``transport=`` overrides both (e.g. ``httpx.MockTransport``)."""

    def __init__(self, base_url: str = DEFAULT_URL, *,
                 transport: Optional[httpx.AsyncBaseTransport] = None,
                 max_connections: Optional[int] = 100, http_backend: HTTPBackend = "auto",
                 **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        limits = httpx_limits(max_connections)
        backend = resolve_backend(http_backend)
        #: what sends: "aiohttp", "httpx", or "custom" (a ``transport=`` of the caller's)
        self.http_backend = backend if transport is None else "custom"
        if transport is None and backend == "aiohttp":
            transport = aiohttp_transport(self.base_url, max_connections)
        self._http = httpx.AsyncClient(transport=transport, limits=limits,
                                       **self._http_settings)

    async def __aenter__(self) -> AsyncHeroClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[_Model]) -> _Model:
        for attempt in range(1, self.retry.max_attempts + 1):
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(call.method, call.path, json=call.json,
                                                   params=call.query)
            except httpx.TransportError as exc:
                outcome = exc
            if _succeeded(outcome):
                return call.parse(outcome)
            await asyncio.sleep(self._retry_delay(call, attempt, outcome))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _post_rewards(self, request: RewardsRequest, limit: asyncio.Semaphore,
                            run: Optional[str] = None) -> RewardsResponse:
        async with limit:
            return await self._send(_rewards_call(request, run))

    async def score(
        self,
        groups: Iterable[GroupLike],
        *,
        mode: Mode = "hero",
        verifier: Optional[VerifierName] = None,
        params: ParamsLike = None,
        sigma_ref: Optional[float] = None,
        request_id: Optional[str] = None,
        run: Optional[str] = None,
    ) -> RewardsResponse:
        """As :meth:`HeroClient.score`."""
        requests = self._plan(groups, mode, verifier, params, sigma_ref, request_id)
        limit = asyncio.Semaphore(self.max_concurrency)
        parts = await asyncio.gather(*(self._post_rewards(r, limit, run) for r in requests))
        return self._finish(requests, parts, request_id)

    async def get_reward(self, query: Sequence[str], prompts: Optional[Sequence[str]] = None,
                         labels: Optional[Sequence[Optional[str]]] = None) -> GetRewardResponse:
        return await self._send(_get_reward_call(query, prompts, labels))

    async def info(self) -> InfoResponse:
        return await self._send(_INFO_CALL)
