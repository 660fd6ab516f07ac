"""Baselines every DEMIST model must beat: a voxelwise ridge model, a constant predictor, and the deep
translation baselines KL-GAN, VQ-VAE and cWDM (`translation`).

All implement `demist.inference.base.Synthesizer` and save to run directories (method = the baseline's name,
stage "baseline"). This module holds what their training commands share: which manifest sessions to train on,
and preparing them one at a time so memory does not grow with the cohort.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from tqdm import tqdm

from demist.config import Config
from demist.data.manifest import SessionRecord, training_records  # noqa: F401 - re-exported for the baselines
from demist.data.preprocess import PreparedSession, prepare_session
from demist.errors import DemistError

#: The stage name of every baseline run directory.
BASELINE_STAGE = "baseline"


def iter_prepared(records: Sequence[SessionRecord], config: Config, progress: bool = True) -> Iterator[PreparedSession]:
    """Prepare sessions lazily (with their PSR target), one at a time."""
    for record in tqdm(records, desc="sessions", unit="session", disable=not progress):
        yield prepare_session(record, config.data, need_target=True)


#: Baselines that are one trained network (module demist.baselines.<name>, class <NAME>Synthesizer).
DEEP_BASELINES = {"klgan": "KLGANSynthesizer", "vqvae": "VQVAESynthesizer", "cwdm": "CWDMSynthesizer"}
#: Every baseline method a run directory can hold.
BASELINE_METHODS = ("ridge", "constant", *DEEP_BASELINES)


def load_baseline(run, **options):  # -> RidgeSynthesizer | ConstantSynthesizer | TranslationSynthesizer
    """The baseline synthesizer a verified baseline run holds (`run` is a `demist.runs.RunInfo`).

    `options` (device; sampler and steps for cWDM) go to the deep baselines; ridge and constant ignore them.
    """
    if run.method == "ridge":
        from demist.baselines.ridge import RidgeSynthesizer

        return RidgeSynthesizer.load(run.path)
    if run.method == "constant":
        from demist.baselines.constant import ConstantSynthesizer

        return ConstantSynthesizer.load(run.path)
    if run.method in DEEP_BASELINES:
        import importlib

        module = importlib.import_module(f"demist.baselines.{run.method}")
        synthesizer = getattr(module, DEEP_BASELINES[run.method])
        accepted = {"device", *synthesizer.load_options}
        return synthesizer.from_run(run, **{k: v for k, v in options.items() if k in accepted and v is not None})
    raise DemistError(f"run {run.path}: method {run.method!r} is not a baseline; expected one of "
                      f"{', '.join(BASELINE_METHODS)}")
