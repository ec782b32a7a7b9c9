"""The small-loss rule with a share that adapts to the pool: ``drop_ppl_outliers`` = k.

A scored sample whose log PPL (its mean answer NLL) exceeds the pool's median log PPL by more than
k scaled median absolute deviations (1.4826 MAD, a normal's standard deviation; lower medians) is
never kept; K still counts it. A pool whose log PPLs are tightly bunched (MAD 0) loses every sample
above its median; one whose median is +inf loses none. docs/options.md has the evidence (best on
clean data, failed with a third of the pool wrong)."""

from __future__ import annotations

from ..options import Option
from . import Pool, Rule, torch


class DropPPLOutliers(Rule):
    name = "PPL outliers (drop_ppl_outliers)"
    position = 20
    options = (Option("drop_ppl_outliers", None, "never keep a sample whose log PPL exceeds the pool's median by more "
                      "than k scaled MADs (the small-loss rule with an adaptive share); null: off (the paper)",
                      kind="number", group="rules", open_low=True, optional=True),)
    metric = "high_ppl_excluded"
    log_field = "excluded"

    @classmethod
    def is_active(cls, config) -> bool:
        return config.drop_ppl_outliers is not None

    @classmethod
    def check(cls, config) -> None:
        if config.drop_ppl_outliers is not None and config.drop_highest_ppl:
            raise ValueError(f"QTuningConfig: drop_highest_ppl ({config.drop_highest_ppl!r}) and drop_ppl_outliers "
                             f"({config.drop_ppl_outliers!r}) are two rules for the same drop; set one of them (the "
                             "other to 0 / null)")

    def exclude(self, pool: Pool) -> torch.Tensor:
        scored = pool.scored
        if not scored.any():
            return torch.zeros_like(scored)
        x = pool.ppl[scored].to(torch.float64).log()
        median = x.median()
        if not torch.isfinite(median):
            return torch.zeros_like(scored)
        spread = 1.4826 * (x - median).abs().median()
        return scored & (pool.ppl.to(torch.float64).log() > median + self.config.drop_ppl_outliers * spread)
