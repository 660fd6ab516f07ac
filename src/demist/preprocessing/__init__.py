"""From raw scanner NIfTI to what `demist synthesize` takes: bias correction, brain extraction and FLAIR → T1w rigid
registration (`demist preprocess`), for single sessions, manifests and BIDS datasets.

The tools come from the optional extra `demist[preprocess]`: ANTsPy (N4 and rigid registration: the same ANTs that
fMRIPrep and most MS pipelines use, in one wheel with no run-time download) and deepbet (brain extraction by a
published network whose weights ship inside its wheel). Nothing here downloads anything.
"""
