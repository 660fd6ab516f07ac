"""Reference rows (`base.REFERENCES`): what a DEMIST run's autoencoders give without diffusion, scored like methods.

- `ae-ceiling`: D_PSR(E_PSR(y)), the true PSR through the PSR autoencoder: no method that decodes with D_PSR can do
  better (it needs the true PSR, so it exists only where the manifest has one);
- `aligned-condition`: D_PSR(z_c), the aligned condition latent decoded directly: what the streams must improve on.

Both run through the same encoders, windows, tiling and way back to the native grid as DEMIST's own synthesis, so the
gap between them and DEMIST is the diffusion stage's doing. They are diagnostics, never a method's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from demist.batch_log import BatchSummary, run_batch
from demist.config import Config
from demist.data.manifest import SessionRecord, load_manifest, prediction_path
from demist.data.nifti import save_image
from demist.data.preprocess import PreparedSession, prepare_session
from demist.errors import DemistError
from demist.inference.base import REFERENCES
from demist.inference.demist_synthesizer import DemistSynthesizer
from demist.inference.pipeline import native_map


@dataclass
class ReferenceSynthesizer:
    """A reference row of a DEMIST run (see the module docstring); deterministic."""

    method: str
    config: Config
    demist: DemistSynthesizer

    @classmethod
    def from_synthesizer(cls, demist: DemistSynthesizer, method: str) -> "ReferenceSynthesizer":
        if method not in REFERENCES:
            raise DemistError(f"reference {method!r}: unknown; expected one of {', '.join(REFERENCES)}")
        return cls(method=method, config=demist.config, demist=demist)

    @property
    def needs_target(self) -> bool:
        return self.method == "ae-ceiling"

    @torch.no_grad()
    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, None]:
        """PSR / psr_range on the session's model grid."""
        if self.needs_target:
            if session.psr is None:
                raise DemistError(f"session {session.key}: ae-ceiling needs its true PSR; expected a manifest row "
                                  "with a psr image")
            z = self.demist.encode_target(torch.from_numpy(session.psr)[None, None].to(self.demist.device))
        else:
            z = self.demist.encode_condition(torch.from_numpy(session.condition)[None].to(self.demist.device))
        return self.demist.decode(z)[0, 0].cpu().numpy().astype(np.float32), None


def synthesize_references(demist: DemistSynthesizer, manifest: Path, out_dirs: dict[str, Path],
                          sessions: Sequence[str] | None = None,
                          progress: bool = True) -> dict[str, BatchSummary]:
    """Write each reference row (name → output folder) for the manifest's sessions, as `synthesize_manifest` lays
    them out; resumable, and a failing session is recorded and skipped."""
    records = load_manifest(manifest)
    if sessions is not None:
        wanted = set(sessions)
        records = [r for r in records if r.key in wanted]
    summaries = {}
    for name, out_dir in out_dirs.items():
        reference = ReferenceSynthesizer.from_synthesizer(demist, name)
        summaries[name] = run_batch(records, key=lambda r: r.key,
                                    done=lambda r: prediction_path(Path(out_dir), r).exists(),  # run_batch runs now
                                    work=partial(_write_reference, reference, Path(out_dir)), summary=BatchSummary(),
                                    desc=name, progress=progress)
    return summaries


def _write_reference(reference: ReferenceSynthesizer, out_dir: Path, record: SessionRecord) -> None:
    session = prepare_session(record, reference.config.data, need_target=reference.needs_target)
    mean, _ = reference.predict(session)
    save_image(native_map(mean, session, reference.config.data.psr_range), prediction_path(out_dir, record))
