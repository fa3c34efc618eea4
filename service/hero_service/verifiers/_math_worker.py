"""Code that runs inside verifier worker processes (math-verify's timeouts use signal.alarm, which
only works in a process's main thread). Kept import-light so the fork server preloads it cheaply.

**How a reference is read.** A delimited reference (an unescaped ``$``, ``\\(``, ``\\[`` or
``\\boxed``) goes to math-verify unchanged: that is the library's own default use. Bare references
(how MATH and most RL data store answers: ``7\\pi``, ``1, -2``, ``2,50``) need a rule, because the
library's plain parse of a bare string keeps only the last number it finds (``1, -2`` -> -2, which
would then accept "-2" alone; ``7\\pi`` -> 7). By form:

- thousands separators, ``1,000`` / ``12,345,678`` / ``1,000.5`` (a first group of 1-3 digits not
  starting with 0, then groups of exactly three): the number (1000). ``1,234`` is 1234, not 1.234.
- decimal comma, ``2,50`` / ``0,125`` / ``-3,5`` (digits, ONE comma, digits, and not the form
  above): the decimal number, read as ``$2.50$``. So "2.5" is correct and the set {2, 50} is not.
  The library's plain parse reads these tokens the same way, except that it drops fraction digits
  past the third (``3,14159`` -> 3141); we keep them.
- everything else, lists of solutions included (``1, -2``, ``1,2,3``: a comma with a space, or
  several commas): wrapped in ``$...$`` so the LaTeX extractor reads the whole answer (a list
  becomes a set, order-free); the plain parse is the fallback if that finds nothing. A ``\\$`` is
  a currency sign, not a delimiter (``\\$18.90`` is wrapped too).

So a list of two numbers must be written with a space ("1, 2") or delimited ("$1,2$") to be read
as a list; "1,2" is the decimal 1.2.

**How a response is judged.** ``parse(response)`` as the library does it, then the library's
``verify`` on each pair of (reference reading, response reading) — math-verify yields a symbolic
reading and the matched string — in the library's order, correct as soon as one pair matches. As
in the library, a pair whose comparison raises does not stop the others, so a failed sympy
comparison still falls back to the string comparison (``$10:00$`` parses to zoo, sympy cannot
compare it, the strings match: correct). Unlike the library, a failure is not a silent False: when
no pair matched, a comparison that timed out makes the verdict ``timeout`` and one that raised
makes it ``error``, with the reason in the detail. Parsing keeps ``raise_on_error=True``: there
the library's fallbacks live inside ``parse`` (each match is tried in turn), and the flag only
decides whether a timeout or crash becomes an empty answer or is reported.

**Progress.** Each bounded call (one parse, one comparison: each has its own alarm of
``timeout_s``) starts a step on the task's progress record, so the service can kill a worker whose
step outran its alarm and charge only the response it was on (see progress.py)."""

from __future__ import annotations

import itertools
import re
import resource
from collections import OrderedDict
from collections.abc import Sequence

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from .progress import NO_PROGRESS, Reporter

# (status, detail) pairs cross the process boundary: plain tuples pickle fastest.
Outcome = tuple[str, "str | None"]

# An unescaped $ (\$ is a currency sign), \( or \[, or a \boxed: the reference is delimited.
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA = re.compile(r"([+-]?\d+),(\d+)")

_REFERENCE_CACHE_SIZE = 256
_reference_cache: OrderedDict[tuple[str, int], tuple] = OrderedDict()


def init_worker(memory_mb: int) -> None:
    """Cap the worker's address space so one exploding parse cannot take the host down."""
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def reference_readings(reference: str) -> list[str]:
    """The strings handed to ``parse`` for a reference, in order (the module docstring's rule)."""
    text = reference.strip()
    if _DELIMITED.search(text):
        return [text]
    decimal = _DECIMAL_COMMA.fullmatch(text)
    if decimal and not _THOUSANDS.fullmatch(text):
        return [f"${decimal[1]}.{decimal[2]}$"]
    return [f"${text}$", text]


def parse_reference(reference: str, timeout_s: int, progress: Reporter = NO_PROGRESS) -> tuple:
    """Parse a gold answer once per group (cached per worker: a group's chunks reuse it). A
    reading that fails falls through to the next, as the library's own parse would; if none
    yields an answer, the first failure is raised."""
    key = (reference, timeout_s)
    if key in _reference_cache:
        _reference_cache.move_to_end(key)
        return _reference_cache[key]
    failure: BaseException | None = None
    parsed: tuple = ()
    for reading in reference_readings(reference):
        progress.step()
        try:
            parsed = tuple(parse(reading, parsing_timeout=timeout_s, raise_on_error=True))
        except (TimeoutException, Exception) as exc:  # TimeoutException is a BaseException
            failure = failure or exc
            continue
        if parsed:
            break
    if not parsed and failure is not None:
        raise failure
    _reference_cache[key] = parsed
    if len(_reference_cache) > _REFERENCE_CACHE_SIZE:
        _reference_cache.popitem(last=False)
    return parsed


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "verifier worker ran out of memory"
    if isinstance(exc, RecursionError):
        return "answer nested too deeply"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _compare(gold: Sequence, predicted: Sequence, timeout_s: int, progress: Reporter) -> Outcome:
    """The library's ``verify(gold, predicted)``, pair by pair, keeping its fallbacks but
    reporting the failures it would swallow (see the module docstring)."""
    failure: Outcome | None = None
    for gold_reading, predicted_reading in itertools.product(gold, predicted):
        progress.step()
        try:
            if verify([gold_reading], [predicted_reading], timeout_seconds=timeout_s,
                      raise_on_error=True):
                return ("correct", None)
        except TimeoutException:
            failure = ("timeout", f"math-verify comparison gave up after {timeout_s}s")
        except Exception as exc:  # the next pair may still match
            if failure is None:
                failure = ("error", f"comparison failed: {_describe(exc)}")
    return failure or ("incorrect", None)


def verify_pair(reference: str, response: str, timeout_s: int,
                progress: Reporter = NO_PROGRESS) -> Outcome:
    """One response against its reference. Never raises: a failure is this response's status."""
    try:
        gold = parse_reference(reference, timeout_s, progress)
    except TimeoutException:
        return ("timeout", "reference parsing timed out")
    except Exception as exc:
        return ("error", f"reference: {_describe(exc)}")
    if not gold:
        return ("no_answer", "no parsable answer in the reference")
    progress.step()
    try:
        predicted = parse(response, parsing_timeout=timeout_s, raise_on_error=True)
    except TimeoutException:
        return ("timeout", f"math-verify gave up after {timeout_s}s")
    except Exception as exc:  # any parser failure is this response's error
        return ("error", _describe(exc))
    if not predicted:
        return ("no_answer", "no parsable answer in the response")
    return _compare(gold, predicted, timeout_s, progress)


def verify_chunk(reference: str, responses: Sequence[str], timeout_s: int) -> list[Outcome]:
    """Verify responses that share one reference."""
    return verify_pairs([(reference, response) for response in responses], timeout_s)


def verify_pairs(pairs: Sequence[tuple[str, str]], timeout_s: int,
                 progress: Reporter = NO_PROGRESS) -> list[Outcome]:
    """Verify (reference, response) pairs, possibly from several groups: one task carries many,
    so the per-task cost of the pool is paid once per chunk, not once per response."""
    outcomes: list[Outcome] = []
    for index, (reference, response) in enumerate(pairs):
        progress.item(index)
        outcomes.append(verify_pair(reference, response, timeout_s, progress))
    progress.item(len(pairs))  # done: returning the results is a step of its own
    return outcomes
