"""Answers the model cannot explain by its own uncertainty: ``drop_surprising`` = m (nats per token).

A scored sample is never kept (K still counts it) when its log PPL exceeds its uncertainty by
more than m:

    log PPL - Ent = mean over the answer's tokens of (NLL_t - H_t) > m

NLL_t is the surprise of the label token and H_t the model's expected surprise at that position
(its predictive entropy, the paper's uncertainty). For a label drawn from the model's own
distribution E[NLL_t] = H_t, so the mean is about 0 whatever the task, the model or the other
samples: the rule needs no noise rate and no statistic of the pool. On the EU plane it keeps out
the samples far above the diagonal (error well beyond uncertainty).

Measured (135M model, arithmetic): it caught every garbled answer (words shuffled) and kept out
0-0.5 % of the useful ones; it missed plausible slips (a wrong final number) and one-step answers
swapped from another problem, which look to a small model like its own confident mistakes.
``docs/options.md`` has the evidence.
"""

from __future__ import annotations

from ..options import Option
from . import Pool, Rule, torch


class DropSurprising(Rule):
    name = "surprising answers (drop_surprising)"
    position = 25
    options = (Option("drop_surprising", None, "never keep a sample whose log PPL exceeds its entropy by more than "
                      "this many nats per token (an answer the model's own uncertainty cannot explain, e.g. garbled; "
                      "needs no noise rate); null: off (the paper)",
                      kind="number", group="rules", optional=True),)
    metric = "surprising_excluded"
    log_field = "surprising"

    @classmethod
    def is_active(cls, config) -> bool:
        return config.drop_surprising is not None

    def exclude(self, pool: Pool) -> torch.Tensor:
        excess = pool.ppl.to(torch.float64).log() - pool.entropy.to(torch.float64)
        return pool.scored & (excess > self.config.drop_surprising)
