"""Evaluation: image metrics in the brain, lesion-contrast ROC, subject-grouped folds, statistics, figures and
the evaluation of a folder of predictions against a manifest (`evaluate_predictions`).

Volumes in, numbers and figures out; nothing here knows about models. Names are imported lazily, so
`import demist.evaluation` costs nothing until a function is used (figures pull in matplotlib, lesions scikit-learn).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "image_metrics": "metrics",
    "METRICS": "metrics",
    "HIGHER_IS_BETTER": "metrics",
    "LesionROI": "lesions",
    "lesion_rois": "lesions",
    "estimate_midsagittal_plane": "lesions",
    "roi_means": "lesions",
    "contrast_auc": "lesions",
    "lesion_bias": "lesions",
    "subject_folds": "crossval",
    "load_or_create_splits": "crossval",
    "summarise_folds": "stats",
    "paired_tests": "stats",
    "write_summary_csv": "stats",
    "summary_markdown": "stats",
    "write_summary_markdown": "stats",
    "plot_roc": "figures",
    "plot_qualitative": "figures",
    "plot_error_map": "figures",
    "plot_loss_curves": "figures",
    "summarise_sessions": "stats",
    "evaluate_predictions": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
