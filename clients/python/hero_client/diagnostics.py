"""Where the verifier and the reward model disagree, per response of one group.

Pure functions of small lists, like :mod:`hero_client.hero`: no I/O, O(N log N) per group (two
medians). The service fills ``GroupResult.disagreement`` with :func:`disagreements`.

**The rule.** A group's responses fall into two strata: *verified* (status ``correct``) and
*rejected* (``incorrect`` or ``no_answer``). ``timeout``, ``error`` and ``skipped`` say nothing
about the answer, so those responses are in neither stratum and are never flagged.

- ``likely_false_negative``: rejected, the group has a verified answer, and its RM score is at
  least the median of the verified scores (the RM ranks it with the verified answers).
- ``likely_false_positive``: verified, the group has at least 2 rejected answers, and its score is
  at most the median of the rejected scores *and* below the median of the verified ones.

The comparison stays inside the group because RM scores are on a per-prompt scale: on the dev
data, Qwen2.5-Math-RM-72B scores correct answers from 0.5 to 5.6 depending on the prompt.

The two kinds are deliberately asymmetric. Verifier misses are common (the paper: math_verify
recall 68 % on hard-to-verify data) and may be most of the rejected stratum, so a false negative
is not capped; a lone rejected answer the RM rates with the verified ones is the typical miss.
Verifier false positives are rare (the paper: 0 %), so the false-positive flag needs a rejected
stratum of at least two to compare with and only ever marks the lower half of the verified: one
highly scored rejected answer (itself a likely miss) never flags every correct one.

**No flags** where the RM gives nothing to compare: no RM scores (mode ``verifier``), or a group
whose scores span no more than ``epsilon`` (a constant RM would otherwise mark every rejected
answer), and groups with no verified answer. A verifier that rejects a whole group usually
rejects every response alike (the dev data's all-rejected group is a malformed reference,
``4:30p..``, against eight answers ``4:30 p.m.``), so nothing inside the group separates them,
and a per-run distribution of in-group normalised gaps does not separate them either: the
largest gap between neighbouring scores, over the group's std, is 0.69 to 2.43 in the 45
all-correct dev groups and 1.56 in that all-rejected one, while the gap between the strata
medians of the mixed groups is 0.21 to 2.13. A threshold low enough to flag that group flags
12 of the 45 all-correct ones too. Such groups show in the metrics instead (all-wrong groups).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Optional

from .vocabulary import DisagreementKind, VerifierStatus

VERIFIED_STATUSES: frozenset[VerifierStatus] = frozenset({"correct"})
REJECTED_STATUSES: frozenset[VerifierStatus] = frozenset({"incorrect", "no_answer"})
# Below this span of RM scores within a group, the RM orders nothing (scores are tied).
DEFAULT_EPSILON = 1e-6
# Fewest rejected answers the false-positive flag compares a verified answer with.
MIN_REJECTED_FOR_FALSE_POSITIVE = 2

Disagreement = Optional[DisagreementKind]


def disagreements(statuses: Sequence[VerifierStatus], scores: Optional[Sequence[float]],
                  epsilon: float = DEFAULT_EPSILON) -> Optional[list[Disagreement]]:
    """One entry per response: ``None`` (they agree, or nothing to compare) or the kind of
    disagreement. ``None`` as a whole when there are no RM scores."""
    if scores is None:
        return None
    if len(scores) != len(statuses):
        raise ValueError(f"{len(scores)} RM scores for {len(statuses)} verifier statuses")
    flags: list[Disagreement] = [None] * len(statuses)
    verified = [s for s, status in zip(scores, statuses) if status in VERIFIED_STATUSES]
    rejected = [s for s, status in zip(scores, statuses) if status in REJECTED_STATUSES]
    if not verified or not rejected or max(scores) - min(scores) <= epsilon:
        return flags
    verified_median = statistics.median(verified)
    rejected_median = (statistics.median(rejected)
                       if len(rejected) >= MIN_REJECTED_FOR_FALSE_POSITIVE else None)
    for i, (score, status) in enumerate(zip(scores, statuses)):
        if status in REJECTED_STATUSES and score >= verified_median:
            flags[i] = "likely_false_negative"
        elif (status in VERIFIED_STATUSES and rejected_median is not None
              and score <= rejected_median and score < verified_median):
            flags[i] = "likely_false_positive"
    return flags
