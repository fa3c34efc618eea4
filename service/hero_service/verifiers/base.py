"""The verifier plug-in interface: a rule-based judge of each response against a reference."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from hero_client.vocabulary import VerifierStatus as Status


@dataclass(frozen=True)
class Verdict:
    """One response's verdict. Only "correct" counts as verified; every other status is 0 for the
    reward but is reported, so a failure is never a silent 0."""

    status: Status
    detail: str | None = None

    @property
    def verified(self) -> bool:
        return self.status == "correct"


class Verifier(abc.ABC):
    name: str
    needs_reference: bool = True

    async def start(self) -> None:  # noqa: B027 - optional hook: most verifiers hold nothing
        """Acquire resources (worker processes); called once before serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook, as start()
        """Release resources; called once at shutdown."""

    def ready(self) -> bool:
        return True

    @abc.abstractmethod
    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        """One verdict per response, in order. Never raises for a bad response: a response that
        breaks the verifier gets status "error" or "timeout"."""
