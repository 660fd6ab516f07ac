"""NIfTI I/O, the manifest, preprocessing, patch sampling and the embedded synthetic cohort."""
