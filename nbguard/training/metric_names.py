"""Which variable names say they are a metric worth ranking by ('val_loss', 'acc', 'f1').

A guarded cell records its float variables for the chart, but a running sum (``total``,
``running``, ``running_loss``) is not a score: ranking snapshots by it, or calling one "best",
misleads. Without ``--best``, only names that say what they measure are ranked.
"""

from __future__ import annotations

import re

# Words that name a measure, and whether lower is better.
LOWER = {"loss", "err", "error", "perplexity", "ppl", "mse", "mae", "rmse", "nll", "cer", "wer", "fid"}
HIGHER = {"acc", "accuracy", "f1", "auc", "auroc", "bleu", "rouge", "iou", "miou", "dice", "precision", "recall",
          "map", "top1", "top5", "r2", "score", "psnr", "ssim"}
# Words that make a name an accumulator or a counter, whatever else it says.
ACCUMULATORS = {"total", "running", "sum", "cum", "cumulative", "count", "n", "num", "epoch", "step", "steps", "batch",
                "tmp", "acc_sum"}


def words(name: str) -> list[str]:
    """'valLoss_2' → ['val', 'loss', '2']."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_metric(name: str) -> bool:
    """Whether ``name`` says it measures something (``val_loss``, ``test_acc``, ``f1``) and is not
    an accumulator (``total``, ``running_loss``, ``loss_sum``)."""
    parts = words(name)
    if not parts or any(w in ACCUMULATORS for w in parts):
        return False
    return any(w in LOWER or w in HIGHER for w in parts)


def mode(name: str) -> str:
    """'min' for loss- and error-like names, else 'max'."""
    return "min" if any(w in LOWER or w.startswith(("loss", "err")) for w in words(name)) else "max"


def first_metric(names: list[str]) -> str | None:
    """The first of ``names`` worth ranking by, or None."""
    return next((name for name in names if is_metric(name)), None)
