"""Batch synthesis spread over processes (`accelerate launch`, gloo on the CPU) gives the outputs and the log of one
process, and survives a bad session."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from demist.config import load_config
from demist.data.manifest import load_manifest, write_manifest
from demist.methods import METHODS, TrainJob
from helpers import ellipsoid_session, write_session

DEMIST = str(Path(sys.executable).parent / "demist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_writes_and_log_the_bad_session(tmp_path: Path):
    rows = []
    for i, subject in enumerate(["s1", "s2", "s3", "s4"]):
        rows.append({"subject": subject, "session": "a", "group": "MS",
                     **write_session(tmp_path / subject / "a", ellipsoid_session(shape=(24, 26, 22), seed=i))})
    bad = tmp_path / "bad_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), bad)
    rows.append({**rows[0], "subject": "s5", "flair": str(bad)})  # a 4D FLAIR: one line of error, the batch goes on
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    METHODS["ridge"].train(TrainJob(manifest, load_config("tiny"), tmp_path / "ridge", subjects=["s1", "s2"]))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["synthesize", "--model", str(tmp_path / "ridge"), "--manifest", str(manifest), "--device", "cpu"]
    one = subprocess.run([DEMIST, *args, "--out-dir", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port())]
    two = subprocess.run([*launcher, DEMIST, *args, "--out-dir", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env)
    assert one.returncode == 1, one.stderr[-2000:]  # a session failed: exit 1, the others written
    assert two.returncode != 0 and "4 synthesized, 0 already done, 1 failed" in two.stdout
    assert two.stdout.count("already done") == 1  # the summary is printed once, by the main process
    for record in load_manifest(manifest)[:4]:
        a = nib.load(tmp_path / "one" / record.subject / "a" / "psr.nii.gz")
        b = nib.load(tmp_path / "two" / record.subject / "a" / "psr.nii.gz")
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_array_equal(a.affine, b.affine)
    log_one = (tmp_path / "one" / "synthesis_log.csv").read_text()
    assert log_one == (tmp_path / "two" / "synthesis_log.csv").read_text()
    rows_logged = list(csv.DictReader(log_one.splitlines()))
    assert [r["session"] for r in rows_logged] == ["s1/a", "s2/a", "s3/a", "s4/a", "s5/a"]
    assert [r["status"] for r in rows_logged] == ["written"] * 4 + ["failed"]
    assert "4 dimensions" in rows_logged[-1]["reason"]
    assert not (tmp_path / "two" / "s5").exists()
