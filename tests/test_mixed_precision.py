"""Mixed precision (``--dtype float16|bfloat16``): float32 master weights, dynamic loss scaling,
a 200-step loss curve close to float32's, exact resume, and the CuPy path (the stand-in here).

bfloat16 needs ml_dtypes (``pip install 'tinytensor[bf16]'``); its tests skip without it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import gpt.data
import tinytensor as tt
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_metadata, validate_training_meta
from gpt.model import GPT, GPTConfig
# the run fixtures and helpers (module corpus, temporary data dir, no plotting) are test_train's
from test_train import _data_dir_and_no_plot, corpus, read_metrics, train, workdir  # noqa: F401
from tinytensor.optim import LossScaler, MixedPrecision, resolve_dtype

try:
    import ml_dtypes  # noqa: F401
    HAVE_ML_DTYPES = True
except ImportError:
    HAVE_ML_DTYPES = False
needs_ml_dtypes = pytest.mark.skipif(not HAVE_ML_DTYPES, reason="bfloat16 needs ml_dtypes (pip install ml_dtypes)")
LOW_DTYPES = ["float16", pytest.param("bfloat16", marks=needs_ml_dtypes)]


def tiny(backend="numpy"):
    tt.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)).to(backend)
    return model, model.configure_optimizers(0.1, 1e-3)


def batch(seed=0):
    b = np.random.default_rng(seed).integers(0, 11, (4, 9))
    return b[:, :-1], b[:, 1:]


def weights(model):
    return {k: tt.backend.to_numpy(v).copy() for k, v in model.state_dict().items()}


# -- the loss scaler and the master weights ----------------------------------------------------------------------
def test_loss_scaler_halves_on_overflow_and_grows_after_n_good_steps():
    s = LossScaler(init_scale=2.0 ** 10, growth_interval=3)
    s.update(True), s.update(True)
    assert (s.scale, s.good_steps) == (2.0 ** 10, 2)
    s.update(False)  # an overflow also restarts the count
    assert (s.scale, s.good_steps) == (2.0 ** 9, 0)
    for _ in range(3):
        s.update(True)
    assert (s.scale, s.good_steps) == (2.0 ** 10, 0)
    restored = LossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == {"scale": 2.0 ** 10, "good_steps": 0}


def test_an_overflow_skips_the_step_and_halves_the_scale_then_good_steps_grow_it():
    model, opt = tiny()
    mixed = MixedPrecision(model, np.float16, LossScaler(init_scale=2.0 ** 16, growth_interval=2))
    before, low_before = weights(model), weights(mixed.model)
    x, y = batch()
    # 2**16 is above float16's largest number (65504): the gradient seed is Inf, so every gradient is
    loss = trainer.train_step(model, opt, x, y, 1e-3, grad_clip=1.0, mixed=mixed)
    assert np.isfinite(loss)
    assert (mixed.scaler.scale, mixed.scaler.good_steps) == (2.0 ** 15, 0)
    for name, w in weights(model).items():  # skipped: masters, the copy and AdamW untouched
        np.testing.assert_array_equal(w, before[name], err_msg=name)
    for name, w in weights(mixed.model).items():
        np.testing.assert_array_equal(w, low_before[name], err_msg=name)
    assert opt.state == {} and all(p.grad is None for p in model.parameters())
    # two good steps: the weights move, and the scale doubles after the second
    trainer.train_step(model, opt, x, y, 1e-3, grad_clip=1.0, mixed=mixed)
    assert (mixed.scaler.scale, mixed.scaler.good_steps) == (2.0 ** 15, 1)
    assert not np.array_equal(weights(model)["transformer.wte.weight"], before["transformer.wte.weight"])
    assert {s["step"] for s in opt.state.values()} == {1}
    trainer.train_step(model, opt, x, y, 1e-3, grad_clip=1.0, mixed=mixed)
    assert (mixed.scaler.scale, mixed.scaler.good_steps) == (2.0 ** 16, 0)
    trainer.train_step(model, opt, x, y, 1e-3, grad_clip=1.0, mixed=mixed)  # overflows again
    assert mixed.scaler.scale == 2.0 ** 15 and {s["step"] for s in opt.state.values()} == {2}


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_master_weights_moments_and_gradients_stay_float32(dtype):
    low = resolve_dtype(dtype)
    model, opt = tiny()
    mixed = MixedPrecision(model, low)
    for seed in range(3):
        trainer.train_step(model, opt, *batch(seed), 1e-3, grad_clip=1.0, mixed=mixed)
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())
    assert {a.dtype for s in opt.state.values() for a in (s["exp_avg"], s["exp_avg_sq"])} == {np.dtype(np.float32)}
    # the compute copy is the masters rounded to the low dtype, refreshed after each step; tied weights stay tied
    for (name, w), (_, w_low) in zip(model.state_dict().items(), mixed.model.state_dict().items()):
        assert w_low.dtype == low, name
        np.testing.assert_array_equal(w_low, w.astype(low), err_msg=name)
    assert mixed.model.transformer.wte.weight is not model.transformer.wte.weight
    _, loss = mixed.model(*batch())
    assert loss.dtype == low


@pytest.mark.parametrize("dtype, rtol", [("float16", 0.02), pytest.param("bfloat16", 0.1, marks=needs_ml_dtypes)])
def test_unscaled_gradients_match_float32s(dtype, rtol):
    """The masters' gradients are the float32 run's to the dtype's precision: unscaled (a scale left in
    would be off by 2**15) and not flushed to zero. float16 keeps 11 significant bits, bfloat16 8, and
    the error grows through the layers: 2 % and 10 % of the gradient's norm."""
    ref, _ = tiny()
    x, y = batch()
    _, loss = ref(x, y)
    loss.backward()
    model, _ = tiny()
    mixed = MixedPrecision(model, resolve_dtype(dtype))
    _, low_loss = mixed.model(x, y)
    low_loss.backward(mixed.scaler.seed(low_loss))
    mixed.unscale_grads()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert q.grad.dtype == np.float32
        err = np.linalg.norm(q.grad - p.grad) / np.linalg.norm(p.grad)
        assert err < rtol, (name, err)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "layer_norm", "cross_entropy"])
def test_fused_reductions_run_in_float32_and_return_the_low_dtype(op, dtype, backend_name):
    """Half-precision input: the output and the gradient in its dtype, and as close to float32's as
    rounding the float32 result to it (a half-precision sum of the 64-wide rows would not be)."""
    if dtype == "bfloat16" and backend_name != "numpy":
        pytest.skip("bfloat16 is NumPy-only")
    import tinytensor.functional as F
    low = resolve_dtype(dtype, backend_name)
    x32 = np.random.default_rng(0).normal(0, 3, (8, 64)).astype(np.float32)
    targets = np.arange(8) % 64
    weights_ = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)  # d loss / d output
    run = {"softmax": lambda x: F.softmax(x, -1), "log_softmax": lambda x: F.log_softmax(x, -1),
           "layer_norm": lambda x: F.layer_norm(x, tt.ones(64).to(backend_name).astype(x.dtype), None),
           "cross_entropy": lambda x: F.cross_entropy(x, targets)}[op]
    results = {}
    for dt in (np.float32, low):
        x = tt.tensor(x32.astype(dt), requires_grad=True, backend=backend_name)
        y = run(x)
        (y * tt.tensor(weights_.astype(dt) if y.ndim else np.asarray(1.0, dt),
                       backend=backend_name)).sum().backward()
        assert y.dtype == dt and x.grad.dtype == dt, (y.dtype, x.grad.dtype)
        results[dt] = tt.backend.to_numpy(y.data).astype(np.float32), tt.backend.to_numpy(x.grad).astype(np.float32)
    eps = float(np.finfo(np.float16).eps) if dtype == "float16" else 2.0 ** -7
    for ref, got in zip(results[np.float32], results[low]):
        np.testing.assert_allclose(got, ref, rtol=4 * eps, atol=4 * eps * np.abs(ref).max())


# -- the program --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curves(workdir):
    """200 steps of the tiny preset on the generated corpus, per dtype: (train rows, eval rows)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt.data, "DEFAULT_DATA_DIR", workdir[0] / "data")
        mp.setattr(trainer.Trainer, "_plot", lambda self: None)
        for dtype in ("float32", "float16") + (("bfloat16",) if HAVE_ML_DTYPES else ()):
            run = workdir[0] / f"curve_{dtype}"
            assert train(workdir[1], run, "--dtype", dtype, "--max-iters", 200, "--eval-interval", 100) == 0
            out[dtype] = read_metrics(run)
    return out


# Tolerances on the loss curve, from float32's 200 steps (its loss falls from 4.2 to 2.35):
# - the mean loss over each 20-step window within WINDOW of float32's: float16 rounds weights and
#   activations to 11 significant bits (5e-4 relative), bfloat16 to 8 (4e-3), and the logged loss
#   itself is in the dtype (at 2..4 float16 resolves 0.002, bfloat16 0.016); a real fault (a scale
#   left in, an update lost, a flush to zero) moves the curve by far more (0.1 and up);
# - the evaluations at steps 0, 100 and 200 (4 batches per split) within EVAL of float32's.
# Measured here (eval_iters 2): float16's windows within 0.0004 of float32's (each step's loss within
# 0.001) and its evaluations within 0.0008; bfloat16's within 0.002 (steps 0.008) and 0.004.
CURVE_TOLERANCE = {"float16": {"window": 0.01, "eval": 0.01}, "bfloat16": {"window": 0.03, "eval": 0.03}}


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_200_steps_follow_float32s_loss_curve(curves, dtype):
    (ref_steps, ref_evals), (steps, evals) = curves["float32"], curves[dtype]
    assert [r["step"] for r in steps] == list(range(1, 201)) and [r["step"] for r in evals] == [0, 100, 200]
    ref, low = np.array([r["loss"] for r in ref_steps]), np.array([r["loss"] for r in steps])
    windows = np.abs(ref.reshape(10, 20).mean(1) - low.reshape(10, 20).mean(1))
    assert windows.max() <= CURVE_TOLERANCE[dtype]["window"], windows
    for key in ("train_loss", "val_loss"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(ref_evals, evals)]
        assert max(diffs) <= CURVE_TOLERANCE[dtype]["eval"], (key, diffs)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # and it learned


def test_checkpoints_hold_float32_weights_and_the_scaler_float32_ones_no_scaler(curves, workdir):
    tensors, meta = load_checkpoint(workdir[0] / "curve_float16" / "ckpt.safetensors")
    assert {a.dtype for a in tensors.values()} == {np.dtype(np.float32)}
    assert meta["train_config"]["dtype"] == "float16" and meta["loss_scale"]["scale"] >= 1.0
    _, meta32 = load_checkpoint(workdir[0] / "curve_float32" / "ckpt.safetensors")
    assert "loss_scale" not in meta32 and meta32["train_config"]["dtype"] == "float32"


@pytest.mark.parametrize("bad", [{"scale": 3.0, "good_steps": 0}, {"scale": -2.0, "good_steps": 0},
                                 {"scale": 2.0, "good_steps": -1}, {"scale": 2.0, "good_steps": 1.5},
                                 {"scale": 2.0}, {"scale": 2.0, "good_steps": 0, "x": 1}, [2.0, 0], "2"])
def test_a_bad_loss_scale_in_a_checkpoint_is_refused(curves, workdir, bad):
    path = workdir[0] / "curve_float16" / "ckpt.safetensors"
    meta, specs = read_checkpoint_metadata(path)
    validate_training_meta(dict(meta), path, specs)
    with pytest.raises(CheckpointError, match="loss_scale"):
        validate_training_meta({**meta, "loss_scale": bad}, path, specs)


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_resume_with_float16_is_exact_across_skipped_steps(workdir, tmp_path, monkeypatch, backend):
    """9 steps in one go == 4, then --resume to 9. The scale grows every 2 good steps, so from 2**15
    it reaches 2**16 (above float16's range): steps 3, 6 and 9 overflow, are skipped and halve it, on
    both sides of the resume (saved at step 4, one good step into the count); the scale and its
    count come back from the checkpoint."""
    if backend == "cupy" and not tt.cupy_available():
        pytest.skip("CuPy (or its stand-in) is not available")
    monkeypatch.setattr(LossScaler.__init__, "__defaults__", (2.0 ** 15, 2, 2.0, 0.5))
    skipped = []
    update = LossScaler.update
    monkeypatch.setattr(LossScaler, "update", lambda self, finite: (skipped.append(not finite), update(self, finite)))
    common = ("--dtype", "float16", "--backend", backend, "--lr-decay-iters", 9, "--eval-interval", 4, "--seed", 5)
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(workdir[1], a, "--max-iters", 9, *common) == 0
    assert skipped == [False, False, True] * 3, skipped
    assert train(workdir[1], b, "--max-iters", 4, *common) == 0
    assert train_cli.main(["--resume", "--max-iters", "9", "--out-dir", str(b)]) == 0
    assert skipped[9:] == [False, False, True] * 3
    (steps_a, evals_a), (steps_b, evals_b) = read_metrics(a), read_metrics(b)
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]  # exactly
    assert evals_a[-1]["val_loss"] == evals_b[-1]["val_loss"]
    (ta, meta_a), (tb, meta_b) = load_checkpoint(a / "ckpt.safetensors"), load_checkpoint(b / "ckpt.safetensors")
    assert meta_a["loss_scale"] == meta_b["loss_scale"]
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


def test_float16_on_cupy_follows_numpy(workdir, tmp_path):
    """The CuPy path in float16 (the stand-in without a GPU): NumPy multiplies float16 matrices in
    float32 (no half BLAS), CuPy natively, so the losses agree to float16's precision, not exactly."""
    if not tt.cupy_available():
        pytest.skip("CuPy (or its stand-in) is not available")
    runs = {b: tmp_path / b for b in ("numpy", "cupy")}
    for backend, out in runs.items():
        assert train(workdir[1], out, "--dtype", "float16", "--backend", backend, "--max-iters", 8,
                     "--eval-interval", 4, "--seed", 3) == 0
    (steps_np, evals_np), (steps_cp, evals_cp) = read_metrics(runs["numpy"]), read_metrics(runs["cupy"])
    assert [r["loss"] for r in steps_cp] == pytest.approx([r["loss"] for r in steps_np], abs=0.01)
    assert [r["val_loss"] for r in evals_cp] == pytest.approx([r["val_loss"] for r in evals_np], abs=0.01)
    tensors, meta = load_checkpoint(runs["cupy"] / "ckpt.safetensors")
    assert meta["train_config"]["backend"] == "cupy" and {a.dtype for a in tensors.values()} == {np.dtype("float32")}


@pytest.mark.skipif(not cupy_standin.installed(), reason="counting reads needs the CuPy stand-in")
def test_a_float16_step_on_cupy_reads_back_twice():
    """As in float32 (test_gpt_cupy): the loss and the gradient norm, which also tells an overflow."""
    model, opt = tiny("cupy")
    mixed = MixedPrecision(model, np.float16, LossScaler(init_scale=2.0 ** 16))  # the first step overflows
    for seed in range(3):
        with cupy_standin.count_syncs() as syncs:
            trainer.train_step(model, opt, *batch(seed), 1e-3, grad_clip=1.0, mixed=mixed)
        assert [kind for kind, _ in syncs.events] == ["float()", "float()"], syncs
    assert mixed.scaler.scale == 2.0 ** 15


# -- errors ---------------------------------------------------------------------------------------------------------
def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_bfloat16_without_ml_dtypes_is_one_clear_error(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    assert train(workdir[1], tmp_path / "run", "--dtype", "bfloat16", "--max-iters", 1) == 1
    assert "pip install ml_dtypes" in one_error_line(capsys)


def test_bfloat16_on_cupy_is_one_clear_error(workdir, tmp_path, capsys):
    if not tt.cupy_available():
        pytest.skip("CuPy (or its stand-in) is not available")
    assert train(workdir[1], tmp_path / "run", "--dtype", "bfloat16", "--backend", "cupy", "--max-iters", 1) == 1
    assert "--dtype float16" in one_error_line(capsys)


def test_resume_keeps_the_dtype(workdir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(workdir[1], run, "--dtype", "float16", "--max-iters", 2, "--eval-interval", 2) == 0
    capsys.readouterr()
    assert train_cli.main(["--resume", "--out-dir", str(run), "--dtype", "float32", "--max-iters", "4"]) == 2
    assert "--dtype" in one_error_line(capsys)
    # an unknown dtype is a usage error too
    with pytest.raises(SystemExit) as exc:
        train(workdir[1], tmp_path / "other", "--dtype", "float8")
    assert exc.value.code == 2
