"""The floor under the promotion gate: what a model must reach before it may be promoted (and before a sweep trial
counts as complete), whatever the champion. A model that predicts one class for every image reaches the majority
class's share; `auto` asks for a tenth of the remaining way to a perfect score on top of that (0.19 for ten balanced
classes, 0.55 for two), and a finite loss under four times that of a uniform guess, 4 ln N. A learning rate of 1000
(test accuracy 0.10, loss 8e17) fails both; any model that learned falls far inside them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tapeline.config import PipelineConfig

AUTO_SHARE_OF_THE_REST = 0.1
AUTO_LOSS_FACTOR = 4.0


def chance_accuracy(class_counts: Sequence[int]) -> float:
    """The accuracy of always guessing the most common class of a split."""
    total = sum(class_counts)
    return max(class_counts) / total if total else 0.0


def accuracy_floor(config: PipelineConfig, class_counts: Sequence[int]) -> float:
    """The accuracy a model needs on a split with these class counts: promotion.min_accuracy (auto: chance plus a
    tenth of the rest)."""
    wanted = config.promotion.min_accuracy
    if wanted == "auto":
        chance = chance_accuracy(class_counts)
        wanted = chance + AUTO_SHARE_OF_THE_REST * (1.0 - chance)
    return float(wanted)


def loss_ceiling(config: PipelineConfig, num_classes: int) -> float:
    """The highest loss a model may have: promotion.max_loss (auto: 4 ln N)."""
    wanted = config.promotion.max_loss
    return AUTO_LOSS_FACTOR * math.log(max(2, num_classes)) if wanted == "auto" else float(wanted)


def did_not_learn(config: PipelineConfig, accuracy: float, loss: float, class_counts: Sequence[int],
                  split: str) -> str | None:
    """Why a model with this accuracy and loss on a split (its class counts given) is below the floor (every
    reason, accuracy first), or None."""
    floor, ceiling = accuracy_floor(config, class_counts), loss_ceiling(config, len(class_counts))
    reasons = []
    if not math.isfinite(accuracy) or accuracy < floor:
        reasons.append(f"{split} accuracy {accuracy:.4f} < {floor:.4f} (promotion.min_accuracy; a constant guess "
                       f"scores {chance_accuracy(class_counts):.4f})")
    if not math.isfinite(loss):
        reasons.append(f"{split} loss is {loss}")
    elif loss > ceiling:
        reasons.append(f"{split} loss {loss:.4g} > {ceiling:.4g} (promotion.max_loss)")
    return f"did not learn: {'; '.join(reasons)}" if reasons else None
