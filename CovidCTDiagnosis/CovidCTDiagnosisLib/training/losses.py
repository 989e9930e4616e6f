"""NTS-Net's training losses as DRENet uses them (Yang et al. 2018; Song et al. 2021).

total = CE(backbone's global head) + CE(concatenated prediction) + CE(part classifier on each of
the M proposals) + ranking hinge. The ranking loss teaches the navigator: for every pair of
proposals where the part classifier is more confident in the true class on region i than on
region j, the navigator score of i should exceed that of j by a margin of 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANK_MARGIN = 1.0


def ranking_loss(region_scores: torch.Tensor, part_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """region_scores (B, M), part_logits (B, M, n), targets (B,) -> mean pairwise hinge loss.

    The part classifier's confidence only orders the pairs (no gradient flows into it from here).
    """
    b, m, n = part_logits.shape
    confidence = -F.cross_entropy(part_logits.detach().reshape(b * m, n), targets.repeat_interleave(m), reduction="none").view(b, m)
    more_confident = (confidence[:, :, None] > confidence[:, None, :]).to(region_scores.dtype)  # [b, i, j]: i beats j
    hinge = F.relu(RANK_MARGIN - (region_scores[:, :, None] - region_scores[:, None, :]))
    return (hinge * more_confident).sum((1, 2)).mean()


def drenet_loss(out, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The sum of the four losses, and each as a float for logging."""
    b, m, n = out.part_logits.shape
    terms = {
        "global": F.cross_entropy(out.global_logits, targets),
        "concat": F.cross_entropy(out.logits, targets),
        "part": F.cross_entropy(out.part_logits.reshape(b * m, n), targets.repeat_interleave(m)),
        "rank": ranking_loss(out.region_scores, out.part_logits, targets),
    }
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}
