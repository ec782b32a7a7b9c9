"""Answers the model cannot explain by its own uncertainty: ``drop_surprising`` = m (nats per token).

A scored sample is never kept (K still counts it) when its log PPL exceeds its uncertainty by
more than m:

    log PPL - Ent = mean over the answer's tokens of (NLL_t - H_t) > m

NLL_t is the surprise of the label token and H_t the model's expected surprise at that position
(its predictive entropy, the paper's uncertainty). For a label drawn from the model's own
distribution E[NLL_t] = H_t, so the mean is about 0 whatever the task, the model or the other
samples: the rule needs no noise rate and no statistic of the pool. On the EU plane it keeps out
the samples far above the diagonal (error well beyond uncertainty).

What it catches: answers that do not belong to their prompt or are not language (another problem's
answer, shuffled words, a misaligned pair), which sit 1-4 nats per token above the diagonal. What
it misses: a plausible slip of a few tokens (a wrong final number), diluted over the answer and
alike to the model's own confident mistakes on correct labels. ``docs/options.md`` has the evidence.
"""

from __future__ import annotations

from ..options import Option
from . import Pool, Rule, torch


class DropSurprising(Rule):
    name = "surprising answers (drop_surprising)"
    position = 25
    options = (Option("drop_surprising", None, "never keep a sample whose log PPL exceeds its entropy by more than "
                      "this many nats per token (an answer the model's own uncertainty cannot explain: garbled, or "
                      "another prompt's; needs no noise rate); null: off (the paper)",
                      kind="number", group="rules", optional=True),)
    metric = "surprising_excluded"
    log_field = "surprising"

    @classmethod
    def is_active(cls, config) -> bool:
        return config.drop_surprising is not None

    def exclude(self, pool: Pool) -> torch.Tensor:
        excess = pool.ppl.to(torch.float64).log() - pool.entropy.to(torch.float64)
        return pool.scored & (excess > self.config.drop_surprising)
