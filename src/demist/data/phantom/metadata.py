"""meta.json of a session: who, when, how it was generated, every lesion's parameters and the mid-sagittal plane.

All positions are world (scanner) mm of the session's output affine, after the random head pose.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import ndimage as ndi

from demist.version import __version__
from demist.data.phantom.deformation import midsagittal_plane
from demist.data.phantom.lesions import Lesion
from demist.data.phantom.raster import lesion_in_world
from demist.data.phantom.render import LABELS, SessionVolumes
from demist.data.phantom.subject import SubjectPlan
from demist.data.phantom.templates import TemplateAnatomy


def _lesion_entry(lesion: Lesion, volumes: SessionVolumes, components: np.ndarray, session: int) -> dict:
    """One lesion's parameters, its voxels in the lesion mask and the confluent lesion (mask component) it joins."""
    members = volumes.lesion_maps.members.get(lesion.id, np.zeros(0, np.int64))
    labels = components.ravel()[volumes.support[members]]
    labels = labels[labels > 0]
    group = Counter(labels.tolist()).most_common(1)[0][0] if labels.size else None
    return {
        "id": lesion.id,
        "type": lesion.kind,
        **lesion_in_world(lesion, volumes.pose, volumes.warp),
        "centre_template_mm": [round(float(v), 3) for v in lesion.centre],
        "demyelination": round(lesion.demyelination, 4),
        "edema": round(lesion.edema, 4),
        "destruction": round(lesion.destruction, 4),
        "rim": round(lesion.rim, 4),
        "nawm_drop": round(lesion.nawm_drop, 4),
        "black_hole": lesion.black_hole,
        "shadow_plaque": lesion.shadow_plaque,
        "first_session": lesion.first_session + 1,
        "new": lesion.first_session == session and session > 0,
        "mask_voxels": int(labels.size),
        "confluent_group": int(group) if group is not None else None,
    }


def session_metadata(plan: SubjectPlan, session: int, spacing: float, volumes: SessionVolumes,
                     anatomy: TemplateAnatomy) -> dict:
    """The JSON-ready metadata of session `session` (0-based)."""
    components, n_components = ndi.label(volumes.masks["lesion_mask"], structure=np.ones((3, 3, 3)))
    lesions = [_lesion_entry(les, volumes, components, session) for les in plan.lesions[session]]
    return {
        "subject": plan.subject_id,
        "session": f"ses-{session + 1:02d}",
        "session_index": session + 1,
        "n_sessions": plan.n_sessions,
        "group": plan.group,
        "age": round(plan.age_at(session), 2),
        "years_since_first_session": round(plan.age_at(session) - plan.age, 3),
        "seed": plan.seed,
        "subject_index": plan.index,
        "spacing": float(spacing),
        "shape": list(volumes.grid.shape),
        "generator": f"demist {__version__} synthetic cohort (MNI ICBM152 2009a symmetric anatomy)",
        "midsagittal_plane": midsagittal_plane(anatomy, volumes.warp, volumes.pose),
        "disease_burden": round(plan.burden, 3),
        "atrophy": round(volumes.atrophy, 4),
        "confluent_lesions": int(n_components),
        "lesions": lesions,
        "tissue": plan.tissue.as_dict(),
        "acquisition": volumes.acquisition.as_dict(),
        "head_pose": {"matrix": np.round(volumes.pose.matrix, 6).tolist(),
                      "shift_mm": np.round(volumes.pose.shift, 4).tolist(),
                      "centre_mm": np.round(volumes.pose.centre, 4).tolist()},
        "tissue_labels": {str(k): v for k, v in LABELS.items()},
    }
