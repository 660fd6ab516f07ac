"""The method registry: every method named once, the CLI and `cv --methods` derived from it, runs loaded through it,
and the Python API on a run it loads."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from helpers import ellipsoid_session
from demist.config import load_config
from demist.errors import DemistError
from demist.methods import BASELINES, METHODS, TrainJob, load_synthesizer, parse_methods

CONFIG = load_config("tiny")


def test_every_method_is_one_entry_and_the_ablations_come_from_the_streams():
    assert list(METHODS) == ["demist", "demist-no-crossattn", "demist-no-controlnet", "demist-no-lora", "ftldm",
                             "ridge", "constant", "klgan", "vqvae", "cwdm"]
    assert all(METHODS[name].needs == ("stage1", "backbone") for name in METHODS if name.startswith(("demist", "ft")))
    assert BASELINES == ("ridge", "constant", "klgan", "vqvae", "cwdm")
    assert [m.name for m in parse_methods("demist, ridge")] == ["demist", "ridge", "constant"]
    with pytest.raises(DemistError, match="unknown nope"):
        parse_methods("demist,nope")


def test_train_commands_come_from_the_registry_and_train_what_it_names(small_manifest, tmp_path):
    from demist.cli.methods import COMMANDS, train_command

    assert COMMANDS == ("demist", "ftldm", *BASELINES)  # the ablations are `demist train demist --no-<switch>`
    app = typer.Typer()
    for name in COMMANDS:
        app.command(name)(train_command(name))
    runner = CliRunner()
    result = runner.invoke(app, ["constant", "--manifest", str(small_manifest), "--out",
                                 str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "constant:" in result.output and (tmp_path / "c" / "run.json").exists()
    options = {name: list(inspect.signature(train_command(name)).parameters) for name in COMMANDS}
    in_steps = ["max_steps", "device", "resume", "tensorboard"]
    assert options["klgan"] == options["cwdm"] == ["manifest", "config", "out", *in_steps]
    assert options["ridge"] == options["constant"] == ["manifest", "config", "out"]  # fitted in seconds on the CPU
    assert options["ftldm"] == ["manifest", "stage1", "backbone", "config", "out", *in_steps]
    assert options["demist"] == options["ftldm"] + ["no_crossattn", "no_controlnet", "no_lora"]


def test_runs_load_through_the_registry_and_the_python_api_keeps_the_t1w_grid(small_manifest, tmp_path):
    from demist import Demist
    from demist.baselines.constant import ConstantSynthesizer

    METHODS["constant"].train(TrainJob(small_manifest, CONFIG, tmp_path / "c"))
    loaded = load_synthesizer(tmp_path / "c", device="cpu", sampler="ddim", steps=3)  # options it ignores
    assert isinstance(loaded, ConstantSynthesizer)
    images = ellipsoid_session(seed=4)
    result = Demist.load(tmp_path / "c", device="cpu").synthesize(images["t1w"], images["flair"],
                                                                  images["brain_mask"])
    np.testing.assert_allclose(result.psr.affine, images["t1w"].affine)
    inside = images["brain_mask"].get_fdata() > 0
    assert np.allclose(result.psr.get_fdata()[inside], loaded.value * CONFIG.data.psr_range, atol=1e-5)
    assert np.all(result.psr.get_fdata()[~inside] == 0)


def test_the_python_api_checks_images_as_files_are_checked(small_manifest, tmp_path):
    import nibabel as nib

    from demist import Demist

    METHODS["constant"].train(TrainJob(small_manifest, CONFIG, tmp_path / "c"))
    demist = Demist.load(tmp_path / "c", device="cpu")
    images = ellipsoid_session(seed=4)
    t1w, flair, mask = images["t1w"], images["flair"], images["brain_mask"]
    data = flair.get_fdata(dtype=np.float32).copy()
    data[3, 3, 3] = np.nan
    with pytest.raises(DemistError, match="flair image: 1 voxels are NaN"):
        demist.synthesize(t1w, nib.Nifti1Image(data, flair.affine))
    with pytest.raises(DemistError, match="t1w image: got str; expected a nibabel Nifti1Image"):
        demist.synthesize("t1w.nii.gz", flair)
    with pytest.raises(DemistError, match="t1w image: has 4 dimensions"):
        demist.synthesize(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), t1w.affine), flair)
    with pytest.raises(DemistError, match="mask image: the mask is empty"):
        demist.synthesize(t1w, flair, nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine))
    squeezed = nib.Nifti1Image(t1w.get_fdata(dtype=np.float32)[..., None], t1w.affine)  # (X, Y, Z, 1) is a volume
    result = demist.synthesize(squeezed, flair, mask)
    np.testing.assert_allclose(result.psr.affine, t1w.affine)


def test_a_run_that_cannot_synthesize_is_refused_by_name(tmp_path: Path):
    from demist.runs import write_run

    write_run(tmp_path / "s1", method="demist", stage="stage1", config=CONFIG, components={}, parents={})
    with pytest.raises(DemistError, match="'stage1' run of 'demist', which cannot synthesize"):
        load_synthesizer(tmp_path / "s1")


def test_the_readme_methods_table_is_the_registry():
    from demist.methods import methods_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- methods table: generated -->\n") + len("<!-- methods table: generated -->\n")
    assert readme[start:readme.index("<!-- end of methods table -->")] == methods_markdown()


def test_train_demist_has_one_ablation_flag_per_stream_switch():
    import inspect

    from demist.cli.methods import train_command
    from demist.config_sections import STREAM_SWITCHES

    flags = {name: p.default for name, p in inspect.signature(train_command("demist")).parameters.items()
             if name.startswith("no_")}
    assert set(flags) == {f"no_{switch}" for switch in STREAM_SWITCHES.values()}
    assert all(option.param_decls == (f"--{name.replace('_', '-')}",) for name, option in flags.items())
