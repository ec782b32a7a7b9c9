"""The small-loss rule (co-teaching's forget rate, Han et al. 2018): ``drop_highest_ppl`` = f.

In each pool the floor(f n') scored samples with the highest PPL are never kept (of equal PPL the
later goes first); K still counts them. Once the model has learned the task, a plausible wrong
label is the pool's highest error, so f is set to about the share of wrong labels expected.
docs/options.md has the evidence (where it won, where it cost)."""

from __future__ import annotations

from ..options import Option
from . import Pool, Rule, torch


class DropHighestPPL(Rule):
    name = "small-loss (drop_highest_ppl)"
    position = 10
    options = (Option("drop_highest_ppl", 0.0, "share f of each pool's highest-PPL samples never kept (the small-loss "
                      "rule against wrong labels; set f near the share of wrong labels); 0: off (the paper)",
                      kind="number", group="rules", low=0.0, high=1.0),)
    metric = "high_ppl_excluded"
    log_field = "excluded"

    @classmethod
    def is_active(cls, config) -> bool:
        return config.drop_highest_ppl > 0

    def exclude(self, pool: Pool) -> torch.Tensor:
        from ..sample_stage import ascending_ranks, share_of

        scored = pool.scored
        excluded = torch.zeros_like(scored)
        n_drop = share_of(int(scored.sum()), self.config.drop_highest_ppl)
        if n_drop:
            at = scored.nonzero().squeeze(1)
            excluded[at[ascending_ranks(pool.ppl[at].to(torch.float64)) >= at.numel() - n_drop]] = True
        return excluded
