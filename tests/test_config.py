import dataclasses
from pathlib import Path

import pytest

from demist.config import PRESETS, config_from_dict, config_to_dict, load_config
from demist.errors import DemistError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_preset_is_the_bundle_architecture():
    cfg = load_config("paper")
    assert cfg.autoencoder.channels == (64, 128, 256) and cfg.autoencoder.latent_channels == 8
    assert cfg.unet.channels == (256, 256, 512)
    assert cfg.unet.attention_levels == (False, True, True)
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (0.0015, 0.0195)
    assert cfg.data.spacing == 1.0 and cfg.data.patch_size == (96, 96, 96)


def test_override_file_changes_only_its_keys(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "tiny"\n[stage1]\nsteps = 7\n[demist]\nlora = false\n')
    cfg, tiny = load_config(f), load_config("tiny")
    assert cfg.stage1.steps == 7 and cfg.demist.lora is False
    assert cfg.unet == tiny.unet and cfg.stage1.batch_size == tiny.stage1.batch_size


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('base = "tiny"\n[stage1]\nstepz = 7\n', "stage1.stepz: unknown"),
        ('base = "tiny"\n[stage9]\nsteps = 7\n', "stage9: unknown"),
        ('base = "tiny"\n[stage1]\nsteps = "many"\n', "stage1.steps: got 'many'"),
        ('base = "tiny"\n[data]\npatch_size = [64, 64]\n', "data.patch_size: got 2 values"),
        ('base = "huge"\n', "base = 'huge'"),
        ("not toml [", "not valid TOML"),
        ('base = "tiny"\n[demist]\ntimestep_power = 0.0\n', "demist.timestep_power: got 0.0"),
        ('base = "tiny"\n[demist]\nema_decay = 1.0\n', "demist.ema_decay: got 1.0"),
        ('base = "tiny"\n[train]\nlog_every = 0\n', "train.log_every: got 0; expected an integer >= 1"),
        ('base = "tiny"\n[train]\ncheckpoint_every = 0\n', "train.checkpoint_every: got 0"),
        ('base = "tiny"\n[data]\npsr_range = 0.0\n', "data.psr_range: got 0.0; expected a number > 0"),
        ('base = "tiny"\n[data]\nspacing = -2.0\n', "data.spacing: got -2.0"),
        ('base = "tiny"\n[data]\npatch_size = [32, 0, 32]\n', "data.patch_size: got [32, 0, 32]"),
        ('base = "tiny"\n[demist]\nbatch_size = 0\n', "demist.batch_size: got 0"),
        ('base = "tiny"\n[align]\nlearning_rate = 0.0\n', "align.learning_rate: got 0.0"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DemistError, match=None) as info:
        load_config(f)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_is_an_error():
    with pytest.raises(DemistError, match="neither a preset"):
        load_config("medium")


def test_a_stored_config_from_before_a_key_existed_takes_the_presets_value(caplog) -> None:
    stored = config_to_dict(load_config("tiny", overrides={"baselines": {"ftldm_learning_rate": 0.5}}))
    del stored["stage1"]["mixed_precision"]
    with caplog.at_level("WARNING"):
        restored = config_from_dict(stored)
    assert restored.stage1.mixed_precision == load_config("tiny").stage1.mixed_precision
    assert restored.baselines.ftldm_learning_rate == 0.5  # stored values are kept
    assert "stage1.mixed_precision missing" in caplog.text
    stored["stage1"]["colour"] = 1
    with pytest.raises(DemistError, match="stage1.colour: unknown"):
        config_from_dict(stored)


def test_a_stored_demist_run_from_before_the_output_head_keeps_its_architecture() -> None:
    """tiny now turns the head on; a run written before the key existed had none, and must load without it."""
    stored = config_to_dict(load_config("tiny"))
    assert stored["demist"]["controlnet_output_head"] is True
    del stored["demist"]["controlnet_output_head"]
    assert config_from_dict(stored).demist.controlnet_output_head is False


def test_a_key_filled_with_what_old_runs_did_is_a_note_not_a_warning(caplog) -> None:
    stored = config_to_dict(load_config("tiny"))
    del stored["demist"]["ema_decay"]  # in ADDED_KEYS: the value reproduces the old run exactly
    with caplog.at_level("INFO", logger="demist.config"):
        config_from_dict(stored)
    [record] = [r for r in caplog.records if "demist.ema_decay missing" in r.getMessage()]
    assert record.levelname == "INFO"


@pytest.mark.parametrize("section", ["train", "stage1"])
def test_an_unknown_mixed_precision_names_its_key(section) -> None:
    with pytest.raises(DemistError, match=f"{section}.mixed_precision: got 'fp8'"):
        load_config("tiny", overrides={section: {"mixed_precision": "fp8"}})


def test_runs_agree_on_a_section_whatever_patch_size_each_stage_chose() -> None:
    cfg = load_config("tiny")
    other_patch = cfg.replace(data=dataclasses.replace(cfg.data, patch_size=(32, 32, 32)))
    assert cfg.first_difference(other_patch, ("autoencoder", "data")) is None
    cfg.require_same(other_patch, ("data",), "--stage1 RUN")
    other_range = cfg.replace(data=dataclasses.replace(cfg.data, psr_range=0.3))
    assert cfg.first_difference(other_range, ("autoencoder", "data", "unet")) == "data"
    other_unet = cfg.replace(unet=dataclasses.replace(cfg.unet, num_res_blocks=2))
    with pytest.raises(DemistError, match=r"section \[unet\] differs from that of --backbone RUN"):
        cfg.require_same(other_unet, ("data", "unet"), "--backbone RUN")


@pytest.mark.parametrize("data, key", [({"percentile_margin_mm": -4.0}, "data.percentile_margin_mm"),
                                       ({"percentile_low": 99.5}, "data.percentile_low")])
def test_a_bad_input_scaling_names_its_key(data, key) -> None:
    with pytest.raises(DemistError, match=key):
        load_config("tiny", overrides={"data": data})


def test_the_example_configs_in_docs_load_and_fit_together() -> None:
    """docs/configs/*.toml are what the docs tell users to run: each loads, passes Stage 2's own checks (an image hint
    downsamples as the autoencoder does), and its patch is a whole number of latent voxels."""
    from demist.inference.memory import downsampling
    from demist.training.stage2 import stage2_config

    files = sorted((Path(__file__).resolve().parents[1] / "docs" / "configs").glob("*.toml"))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.preset.endswith(path.name)
        factor = downsampling(cfg)
        assert all(p % factor == 0 for p in cfg.data.patch_size), path.name
        assert stage2_config(cfg, None) == cfg, path.name  # raises on a hint that downsamples otherwise


def test_the_lesion_protocols_library_default_is_the_presets():
    """`lesion_rois` and `evaluate_predictions` called without a config use the ring the presets use."""
    from demist.evaluation.lesions import RING_MM

    assert all(load_config(name).evaluation.ring_mm == RING_MM for name in ("tiny", "paper"))
