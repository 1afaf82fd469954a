"""Which weights the online predictions use: the adapted ones, or those training started from.

Self-supervised adaptation can make a model worse where it was already good: at home, a few
dozen noisy steps of the head move it away from what pretraining found (docs/selfsup.md). A
robot cannot check that against ground truth, but it can check it against its LiDAR. A new
sample is scored before it enters the replay buffer, so before any gradient step has used it
(prequentially; a learner behind the replay skips the older waiting samples, counted, and
neither scores nor trains on them: training/online.py GUARD_QUEUE), against the solved
geometric term's solution for it (model/selfsup.py SolvedGeometric: Gauss-Newton on the LiDAR's
point-to-plane objective, a few millimetres from the true step): the mean squared displacement
of the sample's scan points between the predicted step and the solution, once for the weights
being trained (the candidate) and once for the reference weights. Predictions switch to the
candidate only while, over the last `window` scored samples, its score is the lower by more
than `confidence` standard errors of the paired differences' mean (a one-sided test); otherwise
they keep the reference. A plain comparison of the means let through candidates that had been
better over the window but no longer were (docs/selfsup.md). And with `retreat` > 0 the
candidate is refused as soon as it scored significantly worse over the last `retreat` samples,
however the window reads: slow to adopt, quick to retreat (a head adapted on a drive kept
predicting motion through a stop while the window still held the drive's gains).

The comparison is paired (the same samples, the same solutions), and an error e in a solution
enters the difference only as 2 e . (candidate - reference): the difference estimates that of
the two squared errors against the truth without bias. A score weighted by the objective's
Hessian would not: it weights the well-constrained directions (rotation, lateral, vertical),
while the forward translation carries most of the error.
"""
from collections import deque
import math
import statistics


class DeploymentGuard:
    """Paired prequential comparison of the candidate's and the reference's score per sample."""

    def __init__(self, window: int, min_samples: int, confidence: float = 2.0,
                 retreat: int = 0):
        """retreat: the candidate is refused while over the last `retreat` scored samples (at
        most the window's) it was significantly worse (0 = no such check)."""
        if window < 1 or not 2 <= min_samples <= window or confidence < 0 or \
                not (retreat == 0 or 2 <= retreat):
            raise ValueError(f'DeploymentGuard needs window >= 1, 2 <= min_samples <= window, '
                             f'confidence >= 0 and retreat 0 or >= 2, got {window}, '
                             f'{min_samples}, {confidence}, {retreat}')
        self.min_samples, self.confidence = min_samples, confidence
        self.retreat = min(retreat, window) if window >= 2 else 0
        self.retreats = 0                       # decisions the recent check turned round
        self.pairs = deque(maxlen=window)       # (candidate, reference) per scored sample
        self.scored = 0
        self.unscorable = 0                     # no solution (too few correspondences, no LiDAR)
        self.skipped = 0                        # neither scored nor trained on: learner behind
        self.stored_unscored = 0                # waiting when training stopped: stored unscored
        self.candidate_score = self.reference_score = math.nan    # window means [m^2]
        self.switches = 0
        self.adapted = False                    # what the last decision chose
        self.decisions = self.adapted_decisions = 0

    def add(self, candidate, reference, valid) -> None:
        """Per-sample scores [m^2] (sequences of floats) of one scoring; invalid rows are
        only counted."""
        for c, r, ok in zip(candidate, reference, valid):
            if not ok or not (math.isfinite(c) and math.isfinite(r)):
                self.unscorable += 1
                continue
            self.pairs.append((c, r))
            self.scored += 1
        if self.pairs:
            self.candidate_score = sum(c for c, _ in self.pairs) / len(self.pairs)
            self.reference_score = sum(r for _, r in self.pairs) / len(self.pairs)

    def prefer_adapted(self) -> bool:
        """The decision for the next hand-over to predictions (counted)."""
        adapted = len(self.pairs) >= self.min_samples and self.margin() > 0.0
        if adapted and self.recently_worse():
            adapted = False
            self.retreats += 1
        self.switches += int(adapted != self.adapted)
        self.adapted = adapted
        self.decisions += 1
        self.adapted_decisions += int(adapted)
        return adapted

    def recently_worse(self) -> bool:
        """Over the last `retreat` scored samples the candidate scored worse by more than
        `confidence` standard errors (a one-sided test the other way round). A lasting change
        of conditions that the candidate gets wrong (a car coming to a stop after a drive the
        head adapted on) shows here within a few samples, long before it moves the window's
        mean."""
        if not self.retreat or len(self.pairs) < self.retreat:
            return False
        gains = [r - c for c, r in list(self.pairs)[-self.retreat:]]
        return statistics.fmean(gains) + \
            self.confidence * statistics.stdev(gains) / math.sqrt(len(gains)) < 0.0

    def margin(self) -> float:
        """How much lower the candidate's mean score is than the reference's, less `confidence`
        standard errors of that difference (> 0: the candidate is better)."""
        if len(self.pairs) < 2:
            return -math.inf
        gains = [r - c for c, r in self.pairs]
        return statistics.fmean(gains) - \
            self.confidence * statistics.stdev(gains) / math.sqrt(len(gains))

    def stats(self) -> dict:
        return {'guard_adapted': bool(self.adapted),
                'guard_scored_samples': int(self.scored),
                'guard_unscorable_samples': int(self.unscorable),
                'guard_skipped_samples': int(self.skipped),
                'guard_unscored_stored_samples': int(self.stored_unscored),
                'guard_switches': int(self.switches),
                'guard_retreats': int(self.retreats),
                'guard_adapted_share': self.adapted_decisions / self.decisions
                if self.decisions else math.nan,
                'guard_candidate_score': float(self.candidate_score),
                'guard_reference_score': float(self.reference_score)}
