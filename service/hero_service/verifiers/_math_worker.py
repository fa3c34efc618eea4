"""Code that runs inside verifier worker processes (math-verify's timeouts use signal.alarm, which
only works in a process's main thread). Kept import-light so the fork server preloads it cheaply."""

from __future__ import annotations

import functools
import resource
from typing import Sequence

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# (status, detail) pairs cross the process boundary: plain tuples pickle fastest.
Outcome = tuple[str, "str | None"]


def init_worker(memory_mb: int) -> None:
    """Cap the worker's address space so one exploding parse cannot take the host down."""
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@functools.lru_cache(maxsize=256)
def parse_reference(reference: str, timeout_s: int) -> tuple:
    """Parse a gold answer once per group (cached per worker: a group's chunks reuse it).

    References come bare ("\\frac{1}{9}") or already delimited; bare LaTeX is wrapped in $...$
    so the LaTeX extractor sees it, with plain parsing as the fallback."""
    text = reference.strip()
    candidates = [text] if ("$" in text or "\\boxed" in text) else [f"${text}$", text]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=timeout_s, raise_on_error=True)
        if parsed:
            return tuple(parsed)
    return ()


def _verify_one(gold: list, response: str, timeout_s: int) -> Outcome:
    try:
        predicted = parse(response, parsing_timeout=timeout_s, raise_on_error=True)
        if not predicted:
            return ("no_answer", "no parsable answer in the response")
        ok = verify(gold, predicted, timeout_seconds=timeout_s, raise_on_error=True)
        return ("correct", None) if ok else ("incorrect", None)
    except TimeoutException:
        return ("timeout", f"math-verify gave up after {timeout_s}s")
    except MemoryError:
        return ("error", "verifier worker ran out of memory")
    except RecursionError:
        return ("error", "answer nested too deeply")
    except Exception as exc:  # noqa: BLE001 - any parser failure is this response's error
        return ("error", f"{type(exc).__name__}: {str(exc)[:200]}")


def verify_chunk(reference: str, responses: Sequence[str], timeout_s: int) -> list[Outcome]:
    """Verify responses that share one reference."""
    return verify_pairs([(reference, response) for response in responses], timeout_s)


def verify_pairs(pairs: Sequence[tuple[str, str]], timeout_s: int) -> list[Outcome]:
    """Verify (reference, response) pairs, possibly from several groups: one task carries many,
    so the per-task cost of the pool is paid once per chunk, not once per response."""
    outcomes: list[Outcome] = []
    for reference, response in pairs:
        try:
            gold = list(parse_reference(reference, timeout_s))
        except TimeoutException:
            outcomes.append(("timeout", "reference parsing timed out"))
            continue
        except Exception as exc:  # noqa: BLE001
            outcomes.append(("error", f"reference: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        if not gold:
            outcomes.append(("no_answer", "no parsable answer in the reference"))
        else:
            outcomes.append(_verify_one(gold, response, timeout_s))
    return outcomes
