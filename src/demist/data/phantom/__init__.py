"""The embedded synthetic MS cohort: realistic T1w, FLAIR and PSR sessions built on the MNI152 anatomy.

`generate_cohort(out_dir, n_subjects)` writes a cohort and returns its manifest. Modules, bottom up: `templates`
(the anatomy), `deformation` (grid, pose, warp), `lesions` and `raster` (MS lesions), `signal` and `tissue`
(relaxation, PSR, image formation), `acquisition` (scanner and fit effects), `subject` and `render` (one subject,
one session), `metadata` and `cohort` (files); `raw` turns clean sessions into scanner-like ones (a head, a bias
field, a moved thick-slice FLAIR) for `demist preprocess`.
"""

from __future__ import annotations

from demist.data.phantom.cohort import generate_cohort
from demist.data.phantom.raw import add_raw_sessions

__all__ = ["add_raw_sessions", "generate_cohort"]
