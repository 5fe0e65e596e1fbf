"""The worklist order: one explained, configurable priority number per study.

    priority = W_flagged x [flagged] + W_failed x [failed] + W_score x score
               + W_wait x minutes waiting

Flagged studies come first (the flagged weight dwarfs the rest), ordered by
score; then studies that could not be read (a person must look at them); then
everything else by score and time waiting, so nothing waits forever.
Acknowledged studies sink to the bottom. Weights come from the config
(``HEMOTRIAGE_PRIORITY_WEIGHT_*``); the worklist shows the formula and each
study's terms.

    rule = PriorityRule.from_config(app.config)
    rule.explain(study_row, now).total
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PriorityTerms:
    """The parts of one study's priority, for display."""

    flagged: float
    failed: float
    score: float
    waiting: float

    @property
    def total(self) -> float:
        """The sort key (higher first)."""
        return self.flagged + self.failed + self.score + self.waiting


@dataclass(frozen=True)
class PriorityRule:
    """Weights of the worklist order.

    Attributes:
        flagged: Added when the study is flagged.
        failed: Added when no slice of the study could be classified.
        score: Multiplies the study score in [0, 1].
        wait_per_min: Added per minute since the study arrived.
    """

    flagged: float = 1000.0
    failed: float = 500.0
    score: float = 100.0
    wait_per_min: float = 1.0

    def __post_init__(self) -> None:
        if min(self.flagged, self.failed, self.score, self.wait_per_min) < 0:
            raise ValueError("priority weights must not be negative")

    @classmethod
    def from_config(cls, config: dict) -> PriorityRule:
        """Read ``PRIORITY_WEIGHT_{FLAGGED,FAILED,SCORE,WAIT_PER_MIN}``.

        In shadow mode (console/shadow.py) the model moves nothing: the flagged
        and score weights are 0, whatever they are set to.
        """
        model_weight = 0.0 if config["SHADOW_MODE"] else 1.0
        return cls(
            flagged=model_weight * float(config["PRIORITY_WEIGHT_FLAGGED"]),
            failed=float(config["PRIORITY_WEIGHT_FAILED"]),
            score=model_weight * float(config["PRIORITY_WEIGHT_SCORE"]),
            wait_per_min=float(config["PRIORITY_WEIGHT_WAIT_PER_MIN"]),
        )

    def explain(self, study, now: float) -> PriorityTerms:
        """The terms of a study row's priority at time ``now`` (seconds since the epoch)."""
        status = study["status"]
        if status == "acknowledged":
            return PriorityTerms(0.0, 0.0, 0.0, 0.0)
        waiting_min = max(0.0, now - study["received_at"]) / 60
        return PriorityTerms(
            flagged=self.flagged if status == "flagged" else 0.0,
            failed=self.failed if status == "failed" else 0.0,
            # A flag keeps the score that raised it: a lower later result moves nothing down.
            score=self.score * max(study["score"] or 0.0, study["flag_score"] or 0.0),
            waiting=self.wait_per_min * waiting_min,
        )

    def formula(self) -> str:
        """The rule in words, shown above the worklist."""
        return (
            f"priority = {self.flagged:g} if flagged + {self.failed:g} if unreadable "
            f"+ {self.score:g} x score + {self.wait_per_min:g} per minute waiting; "
            "acknowledged studies last"
        )
