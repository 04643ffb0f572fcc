"""benchmarks/dasr_vs_ste.py: the paper's init, exact resume, the rows' only difference, the table."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import dasr_vs_ste as bench  # noqa: E402
from recipes.daq_reference import prepare_reference_fx  # noqa: E402
from recipes.models import DAQReferenceResNet  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _float_model(seed: int = 0) -> DAQReferenceResNet:
    torch.manual_seed(seed)
    model = DAQReferenceResNet(20, num_classes=10)
    with torch.no_grad():   # non-trivial BN statistics, as in a trained model
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _checkpoint(tmp_path: Path) -> Path:
    """A random float model in the authors' checkpoint format (``{"state_dict": ...}``)."""
    path = tmp_path / "fp.pth"
    torch.save({"state_dict": _float_model().state_dict(), "epoch": 0}, path)
    return path


def _image_folder(root: Path, classes: int = 4, train: int = 8, test: int = 3) -> Path:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                img[:, :, c % 3] += 100
                img[(c // 3) * 4:(c // 3) * 4 + 4] += 60
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _conv_outputs(qat, images):
    """Per quantized conv: (mean|quantized conv output|, mean|float conv of its float input|), one train-mode pass."""
    quantizers = qat.meta["daq_reference_quantizers"]
    inputs, stats, hooks = {}, {}, []
    for conv, (in_name, _) in quantizers.items():
        hooks.append(qat.get_submodule(in_name).register_forward_pre_hook(
            lambda m, a, conv=conv: inputs.__setitem__(conv, a[0])))
        hooks.append(qat.get_submodule(conv).register_forward_hook(
            lambda m, a, out, conv=conv: stats.__setitem__(conv, (
                float(out.abs().mean()),
                float(F.conv2d(inputs[conv], m.weight, None, m.stride, m.padding).abs().mean())))))
    try:
        with torch.no_grad():
            qat.train()(images)
    finally:
        for h in hooks:
            h.remove()
    return stats


def test_output_scale_init_matches_the_float_conv_magnitude():
    qat = prepare_reference_fx(_float_model(), weight_bits=1, act_bits=1)
    images = torch.randn(8, 3, 16, 16)
    probe = prepare_reference_fx(_float_model(), weight_bits=1, act_bits=1)
    with torch.no_grad():
        probe.train()(images)            # the quantizers' own first-batch init only
    before = _conv_outputs(probe, images)
    assert any(abs(q / f - 1) > 0.05 for q, f in before.values()), "the test needs an uncalibrated start"

    bn_before = {k: v.clone() for k, v in qat.state_dict().items() if "running" in k or "num_batches" in k}
    init = bench.initialize(qat, images)
    state = qat.state_dict()
    for k, v in bn_before.items():       # initialize() leaves the BN running statistics as they were
        assert torch.equal(state[k], v), k
    after = _conv_outputs(qat, images)
    assert set(after) == set(qat.meta["daq_reference_quantizers"]) and len(after) == 18
    for conv, (quantized, reference) in after.items():
        assert quantized == pytest.approx(reference, rel=1e-4), conv
        assert init["output_scale"][conv] == pytest.approx(
            float(qat.get_submodule(conv).weight_fake_quant.output_scale.detach()), rel=1e-6)
        assert init["act_upper"][conv] > 0


def test_rows_differ_only_in_rounding_and_ste_changes_the_weight_gradient():
    models = {row: prepare_reference_fx(_float_model(), 1, 1, rounding=spec["rounding"], beta=spec["beta"])
              for row, spec in bench.ROWS.items()}
    states = {row: m.state_dict() for row, m in models.items()}
    for row in ("ste", "soft-b4"):
        assert states[row].keys() == states["dasr"].keys()
        for k, v in states["dasr"].items():
            assert torch.equal(states[row][k], v), (row, k)
        assert str(models[row].graph) == str(models["dasr"].graph)
    roundings = {row: bench.rounding_of(m) for row, m in models.items()}
    assert len(roundings["dasr"]) == 2 * 18                      # each quantized conv's weight and input
    for conv, (in_name, out_name) in models["dasr"].meta["daq_reference_quantizers"].items():
        assert {f"{conv}.weight_fake_quant", in_name} <= roundings["dasr"].keys()
        assert int(models["dasr"].get_submodule(out_name).fake_quant_enabled[0]) == 0   # int-backend grid: off
    for row, spec in bench.ROWS.items():
        assert set(roundings[row].values()) == {(spec["rounding"], spec["beta"])}
        assert roundings[row].keys() == roundings["dasr"].keys()

    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    grads, losses = {}, {}
    for row in ("dasr", "ste"):
        qat = models[row]
        bench.initialize(qat, x)
        loss = F.cross_entropy(qat.train()(x), y)
        loss.backward()
        losses[row] = float(loss.detach())
        grads[row] = qat.get_submodule("layer2.block_1.0.conv1").weight.grad.clone()
    assert losses["ste"] == losses["dasr"]                        # the same forward (rounding) ...
    assert not torch.allclose(grads["ste"], grads["dasr"], rtol=1e-3, atol=0)   # ... another backward
    assert grads["ste"].abs().sum() > 0 and grads["dasr"].abs().sum() > 0


def _run(data, ckpt, results, work, *extra):
    return bench.main(["--rows", "dasr", "--epochs", "2", "--batch-size", "8", "--tune-per-class", "2",
                       "--data-root", str(data), "--checkpoint", str(ckpt), "--results-dir", str(results),
                       "--work-dir", str(work), "--log-every", "0", "--threads", "1", *extra])


def test_resumed_run_continues_exactly(tmp_path):
    data, ckpt = _image_folder(tmp_path / "data"), _checkpoint(tmp_path)
    assert _run(data, ckpt, tmp_path / "straight", tmp_path / "w1") == 0
    # 1 epoch, then the same command again: it resumes after epoch 1
    for _ in range(2):
        assert _run(data, ckpt, tmp_path / "resumed", tmp_path / "w2", "--stop-after", "1") == 0
    # a third time: already finished, nothing changes
    assert _run(data, ckpt, tmp_path / "resumed", tmp_path / "w2", "--stop-after", "1") == 0

    a = torch.load(tmp_path / "w1" / "dasr" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "w2" / "dasr" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ja = json.loads((tmp_path / "straight" / "dasr-W1A1.json").read_text())
    jb = json.loads((tmp_path / "resumed" / "dasr-W1A1.json").read_text())
    for j in (ja, jb):
        assert j["bits"] == "W1A1" and j["method"].startswith("DASR") and j["planned_epochs"] == 2
        assert j["finished"] and j["epochs_done"] == 2 and [e["epoch"] for e in j["epochs"]] == [1, 2]
        assert {"recipe", "command", "torch", "step0", "float_test_acc"} <= j.keys()
        assert j["command"].startswith("python -m benchmarks.dasr_vs_ste --rows dasr")
        assert j["steps_per_epoch"] == 3                      # 4 classes x (8 - 2) images / 8
    for key in ("test_acc", "train_loss", "train_acc"):
        assert [e[key] for e in ja["epochs"]] == [e[key] for e in jb["epochs"]]
    assert ja["step0"]["test_acc"] == jb["step0"]["test_acc"]
    assert (tmp_path / "straight" / "table.md").is_file()

    # another setting on the same work dir is refused, naming the difference
    with pytest.raises(SystemExit, match="epochs: checkpoint 2 vs now 3"):
        bench.main(["--rows", "dasr", "--epochs", "3", "--batch-size", "8", "--tune-per-class", "2",
                    "--data-root", str(data), "--checkpoint", str(ckpt), "--results-dir", str(tmp_path / "resumed"),
                    "--work-dir", str(tmp_path / "w2")])


def test_non_finite_loss_stops_the_row_naming_it(tmp_path, monkeypatch):
    data, ckpt = _image_folder(tmp_path / "data"), _checkpoint(tmp_path)
    real = F.cross_entropy
    monkeypatch.setattr(bench.F, "cross_entropy", lambda out, y: real(out, y) * float("nan"))
    assert _run(data, ckpt, tmp_path / "r", tmp_path / "w") == 1
    j = json.loads((tmp_path / "r" / "dasr-W1A1.json").read_text())
    assert j["stopped"].startswith("row dasr: the training loss is nan at epoch 1/2, step 1/3")
    assert j["epochs_done"] == 0 and not j["finished"]
    assert "stopped" in (tmp_path / "r" / "table.md").read_text()


def test_smoke_runs_must_write_elsewhere():
    with pytest.raises(SystemExit):
        bench.parse_args(["--max-steps-per-epoch", "2"])
    args = bench.parse_args(["--max-steps-per-epoch", "2", "--results-dir", "/tmp/x"])
    assert Path(args.work_dir) == bench.DEFAULT_SMOKE_WORK


def test_augment_is_a_seeded_crop_and_flip():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 3, 32, 32)
    a = bench.augment(images, torch.Generator().manual_seed(3))
    b = bench.augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.uint8
    # every output is a (possibly flipped) 32x32 window of the zero-padded image
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(2):
        found = any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1))
                    for dy in range(9) for dx in range(9) for w in [padded[i, :, dy:dy + 32, dx:dx + 32]])
        assert found


def _fake_row(row, accs, planned=10):
    return {"row": row, "method": bench.ROWS[row]["method"], "bits": "W1A1", "planned_epochs": planned,
            "epochs_done": len(accs), "finished": len(accs) >= planned, "stopped": None, "float_test_acc": 81.64,
            "step0": {"epoch": 0, "test_acc": 10.5},
            "epochs": [{"epoch": k + 1, "test_acc": a, "train_loss": 1.0, "wall_s": 100.0 + k}
                       for k, a in enumerate(accs)],
            "command": f"python -m benchmarks.dasr_vs_ste --rows {row}", "torch": torch.__version__,
            "threads": 2, "device": "cpu", "smoke": False}


def test_table_only_regenerates_table_and_plot_from_the_jsons(tmp_path):
    for row, accs in (("dasr", [40.0, 55.5, 60.25]), ("ste", [35.0, 50.0]), ("soft-b4", [12.0])):
        (tmp_path / f"{row}-W1A1.json").write_text(json.dumps(_fake_row(row, accs)))
    assert bench.main(["--table-only", "--results-dir", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "400 epochs" in table and "85.8" in table and "81.7" in table and "72.2" in table and "13.5" in table
    lines = table.splitlines()
    dasr = next(l for l in lines if l.startswith("| dasr |"))
    assert "3 / 10" in dasr and "60.25 (3)" in dasr and "| 101 |" in dasr
    assert next(l for l in lines if l.startswith("| 2 |")).startswith("| 2 | 55.50 | 50.00 |  |")
    assert "81.64" in table
    png = tmp_path / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no \\*-W1A1.json"):
        bench.main(["--table-only", "--results-dir", str(tmp_path / "empty")])


def test_one_process_per_row(tmp_path):
    import os
    import subprocess

    with bench.RowLock(tmp_path, "dasr"):
        assert (tmp_path / "lock").read_text() == str(os.getpid())
        with pytest.raises(SystemExit, match=f"process {os.getpid()} is training it already"):
            bench.RowLock(tmp_path, "dasr").__enter__()
    assert not (tmp_path / "lock").exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "lock").write_text(str(gone.pid))         # left by a process that no longer runs
    with bench.RowLock(tmp_path, "dasr"):
        assert (tmp_path / "lock").read_text() == str(os.getpid())


def test_missing_checkpoint_never_overwrites_recorded_epochs(tmp_path):
    """A row whose checkpoint is gone (another machine, a cleaned work dir) must not restart over its JSON."""
    data, ckpt = _image_folder(tmp_path / "data"), _checkpoint(tmp_path)
    assert _run(data, ckpt, tmp_path / "r", tmp_path / "w1", "--stop-after", "1") == 0
    json_path = tmp_path / "r" / "dasr-W1A1.json"
    recorded = json_path.read_text()
    assert len(json.loads(recorded)["epochs"]) == 1
    # same results dir, an empty work dir: refused, naming the way out, and the JSON is untouched
    with pytest.raises(SystemExit, match="records 1 finished epoch.*--restart"):
        _run(data, ckpt, tmp_path / "r", tmp_path / "w2")
    assert json_path.read_text() == recorded
    # --restart starts the row again on purpose
    assert _run(data, ckpt, tmp_path / "r", tmp_path / "w3", "--restart") == 0
    assert json.loads(json_path.read_text())["epochs_done"] == 2
