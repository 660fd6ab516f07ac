"""A workflow folder records the settings its runs were trained with and refuses a rerun with others."""

from __future__ import annotations

import json
import logging

import pytest

from demist.errors import DemistError
from demist.workflows.settings import record_settings

SETTINGS = {"max_steps": None, "prior": "embedded", "config": {"preset": "tiny", "data": {"spacing": 2.0}},
            "method_configs": {"ftldm": {"preset": "tiny", "demist": {"steps": 316}}}}


def test_settings_are_free_until_a_run_finishes_then_fixed(tmp_path):
    file = tmp_path / "cv.json"
    record_settings(file, SETTINGS, runs_finished=False)
    assert json.loads(file.read_text()) == SETTINGS
    changed = {**SETTINGS, "max_steps": 2}
    record_settings(file, changed, runs_finished=False)  # nothing trained yet: the first settings were never used
    assert json.loads(file.read_text())["max_steps"] == 2
    record_settings(file, changed, runs_finished=True)  # the same settings: accepted
    with pytest.raises(DemistError, match=r"other settings \(max_steps 2 → None; config \[data\]\)"):
        record_settings(file, {**SETTINGS, "config": {"preset": "tiny", "data": {"spacing": 1.0}}}, runs_finished=True)
    with pytest.raises(DemistError, match=r"method_configs ftldm demist \[steps\]"):
        record_settings(file, {**changed, "method_configs": {"ftldm": {"preset": "tiny", "demist": {"steps": 9}}}},
                        runs_finished=True)
    assert json.loads(file.read_text())["max_steps"] == 2  # a refusal records nothing


def test_a_new_entry_is_added_and_the_config_s_name_is_not_a_setting(tmp_path):
    file = tmp_path / "cv.json"
    record_settings(file, SETTINGS, runs_finished=False)
    more = {**SETTINGS, "config": {**SETTINGS["config"], "preset": "tiny-copy.toml"},
            "method_configs": {"cwdm": {"preset": "tiny", "baselines": {"steps": 89}}}}
    record_settings(file, more, runs_finished=True)  # a method added to the cross-validation; the same config values
    recorded = json.loads(file.read_text())
    assert set(recorded["method_configs"]) == {"ftldm", "cwdm"}


def test_a_folder_from_before_the_file_is_left_alone_and_a_bad_file_is_one_line(tmp_path, caplog):
    file = tmp_path / "demo.json"
    with caplog.at_level(logging.WARNING, logger="demist.workflows.settings"):
        record_settings(file, SETTINGS, runs_finished=True)
    assert not file.exists() and "cannot be checked" in caplog.text
    file.write_text("[1, 2]")
    with pytest.raises(DemistError, match="holds list; expected the settings"):
        record_settings(file, SETTINGS, runs_finished=True)
    file.write_text("{")
    with pytest.raises(DemistError, match="not valid JSON"):
        record_settings(file, SETTINGS, runs_finished=True)
