"""benchmarks/int_agreement.py: runs on the shared checkpoint and writes well-formed results."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import int_agreement  # noqa: E402


@pytest.mark.slow
def test_one_first_batch_fx_and_pt2e(tmp_path):
    if not (int_agreement.DEFAULT_CHECKPOINT.is_file() and int_agreement.DEFAULT_ARCHIVE.is_file()):
        pytest.skip(f"needs {int_agreement.SHARED_DATA} (project CI and dev machines)")
    out = tmp_path / "agreement.json"
    results = int_agreement.main(["--starts", "0", "--images", "200", "--output", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["images"] == 200 and [row["start"] for row in results["rows"]] == [0]
    for flow, r in results["rows"][0].items():
        if flow == "start":
            continue
        # a trained network: conversion keeps nearly every prediction (the exact figure is luck of
        # which near-tie values the grids produce, see the module docstring)
        assert r["top1"] >= 0.95 and r["cosine"] >= 0.99, (flow, r)
        assert 0.0 <= r["bit_exact_samples"] <= 1.0


@pytest.mark.parametrize("argv,named", [(["--starts", "a,b"], "--starts"), (["--starts", "300"], "--starts"),
                                         (["--images", "64"], "--images"),
                                         (["--checkpoint", "/nonexistent.th"], "--checkpoint")])
def test_bad_arguments_are_named(argv, named, capsys):
    with pytest.raises(SystemExit):
        int_agreement.main(argv)
    assert named in capsys.readouterr().err
