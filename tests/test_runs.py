"""Run directories: written whole, read back verified, refused when incomplete, tampered with or incompatible."""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

import pytest
import torch

from demist.config import load_config
from demist.errors import DemistError
from demist.runs import RUN_FILE, load_weights, read_run, save_weights, sha256_file, write_run


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 2, 3, 3, 3, generator=generator),
            "conv.bias": torch.randn(4, generator=generator),
            "steps": torch.tensor([7], dtype=torch.int64)}


def make_run(path: Path, stage: str = "autoencoder-psr", **kwargs):
    return write_run(path, method="demist", stage=stage, config=load_config("tiny"),
                     components={"autoencoder": toy_state()}, **kwargs)


def edit_run_json(path: Path, **changes) -> None:
    payload = json.loads((path / RUN_FILE).read_text())
    payload.update(changes)
    (path / RUN_FILE).write_text(json.dumps(payload))


def test_weights_round_trip_bit_exact_with_metadata(tmp_path: Path) -> None:
    state = toy_state()
    digest = save_weights(tmp_path / "w.safetensors", state, {"config": "{}", "component": "x"})
    assert digest == sha256_file(tmp_path / "w.safetensors")
    loaded, meta = load_weights(tmp_path / "w.safetensors")
    assert meta["component"] == "x" and meta["config"] == "{}"
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_write_then_read_a_run(tmp_path: Path) -> None:
    parent = make_run(tmp_path / "parent")
    run = write_run(tmp_path / "child", method="demist", stage="stage1", config=load_config("tiny"),
                    components={"psr_autoencoder": toy_state(1), "cond_autoencoder": toy_state(2)},
                    parents={"psr_ae": parent}, latent_scale_factor=1.5, metrics={"align_mse_after": 0.1})
    again = read_run(tmp_path / "child", stages=("stage1",))
    assert again.config == load_config("tiny") and again.stage == "stage1" and again.method == "demist"
    assert again.spacing == 2.0 and again.psr_range == 0.25 and again.latent_scale_factor == 1.5
    assert again.prediction_type is None and again.metrics == {"align_mse_after": 0.1}
    assert again.parents["psr_ae"]["sha256"] == sha256_file(tmp_path / "parent" / RUN_FILE)
    assert all(torch.equal(run.weights("cond_autoencoder")[k], v) for k, v in toy_state(2).items())
    _, meta = load_weights(tmp_path / "child" / "psr_autoencoder.safetensors")
    assert json.loads(meta["config"])["autoencoder"]["latent_channels"] == 8
    with pytest.raises(DemistError, match="no component 'unet'"):
        run.weights("unet")


def test_a_run_is_readable_by_whoever_may_read_new_files(tmp_path: Path) -> None:
    """run.json and the weights get a new file's permissions (the umask's), not a temporary file's owner-only 0600:
    a lab shares its runs."""
    old = os.umask(0o022)
    try:
        write_run(tmp_path / "run", method="demist", stage="autoencoder-psr", config=load_config("tiny"),
                  components={"autoencoder": toy_state()})
    finally:
        os.umask(old)
    for name in (RUN_FILE, "autoencoder.safetensors"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


def test_incomplete_run_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    (tmp_path / "run" / RUN_FILE).unlink()
    with pytest.raises(DemistError, match="incomplete") as info:
        read_run(tmp_path / "run", what="--stage1")
    assert str(info.value).startswith("--stage1 ") and "\n" not in str(info.value)
    with pytest.raises(DemistError, match="not a directory"):
        read_run(tmp_path / "nowhere")
    make_run(tmp_path / "stage1_out" / "stage1")  # `demist train stage1 --out stage1_out` holds the run in stage1/
    with pytest.raises(DemistError, match=r"holds no run.json itself; expected the run inside it, .*stage1_out/stage1"):
        read_run(tmp_path / "stage1_out", what="--stage1")


def test_a_finished_run_is_neither_overwritten_nor_trained_again(tmp_path: Path) -> None:
    from demist.training.run_output import check_out

    make_run(tmp_path / "run")
    with pytest.raises(DemistError, match="already holds a finished run; choose another directory"):
        check_out(tmp_path / "run", resume=False)
    with pytest.raises(DemistError, match="already holds a finished run, which --resume would train again"):
        check_out(tmp_path / "run", resume=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemistError, match="notes.txt: is a file; expected a directory"):
        check_out(tmp_path / "notes.txt", resume=False)
    check_out(tmp_path / "new", resume=False)  # a new directory, or an interrupted run with --resume, is fine
    (tmp_path / "interrupted" / "checkpoints" / "step-10").mkdir(parents=True)
    (tmp_path / "interrupted" / "metrics.jsonl").write_text("{}\n")
    check_out(tmp_path / "interrupted", resume=True)


def test_a_folder_of_other_files_is_not_taken_for_a_run(tmp_path: Path) -> None:
    """`--out` pointing at a folder of inputs would scatter run.json and weights among them."""
    from demist.training.run_output import check_out

    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "t1w.nii.gz").write_bytes(b"")
    for resume in (False, True):
        with pytest.raises(DemistError, match=r"holds files that are not a demist run's \(t1w.nii.gz\)"):
            check_out(tmp_path / "scans", resume=resume)
    (tmp_path / "stage1" / "psr_ae" / "checkpoints").mkdir(parents=True)  # Stage 1 keeps sub-runs inside its own
    (tmp_path / "stage1" / "psr_ae" / ".psr.safetensors.x1.tmp").write_bytes(b"")  # an atomic write's leftover
    check_out(tmp_path / "stage1", resume=False)


def test_tampered_or_missing_component_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    file = tmp_path / "run" / "autoencoder.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(DemistError, match="sha256"):
        read_run(tmp_path / "run")
    file.unlink()
    with pytest.raises(DemistError, match="missing"):
        read_run(tmp_path / "run")


def test_incompatible_version_wrong_stage_and_edited_json_are_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    with pytest.raises(DemistError, match="is a 'autoencoder-psr' run; expected 'stage1'"):
        read_run(tmp_path / "run", stages="stage1")
    edit_run_json(tmp_path / "run", format_version=99)
    with pytest.raises(DemistError, match="version 99"):
        read_run(tmp_path / "run")
    edit_run_json(tmp_path / "run", format_version=1, spacing="two")
    with pytest.raises(DemistError, match="'spacing'"):
        read_run(tmp_path / "run")
    edit_run_json(tmp_path / "run", spacing=2.0, components={"autoencoder": {"file": "../x.safetensors",
                                                                             "sha256": "0"}})
    with pytest.raises(DemistError, match="malformed"):
        read_run(tmp_path / "run")
    (tmp_path / "run" / RUN_FILE).write_text("{not json")
    with pytest.raises(DemistError, match="not readable JSON"):
        read_run(tmp_path / "run")


def test_stored_config_that_no_longer_fits_is_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    payload = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    payload["config"]["stage1"]["made_up"] = 1
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(payload))
    with pytest.raises(DemistError, match="stage1.made_up"):
        read_run(tmp_path / "run")


def test_changed_parent_is_reported(tmp_path: Path, caplog) -> None:
    parent = make_run(tmp_path / "parent")
    write_run(tmp_path / "child", method="demist", stage="stage1", config=load_config("tiny"),
              components={"psr_autoencoder": toy_state()}, parents={"psr_ae": parent})
    make_run(tmp_path / "parent", metrics={"retrained": True})  # a new run.json in the parent's place
    with caplog.at_level(logging.WARNING, logger="demist.runs"):
        read_run(tmp_path / "child")
    assert "has changed" in caplog.text
