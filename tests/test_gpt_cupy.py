"""gpt on the CuPy backend: ``gpt.train.main`` and ``gpt.sample.main`` with ``--backend cupy``
give NumPy's losses and text, resume exactly (with dropout), and a training step reads back
from the GPU at most twice. Without a GPU these run on the stand-in (tests/cupy_standin.py),
which also counts the reads; the counting tests skip on a real GPU.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import gpt.data
import tinytensor as tt
from gpt import sample as sample_cli
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import load_checkpoint
from gpt.model import GPT, GPTConfig
# the run fixtures and helpers (module corpus, temporary data dir, no plotting) are test_train's
from test_train import _data_dir_and_no_plot, corpus, read_metrics, train, workdir  # noqa: F401

pytestmark = pytest.mark.skipif(not tt.cupy_available(), reason="CuPy with a GPU is not available "
                                "(and TINYTENSOR_CUPY_STANDIN=off)")
standin_only = pytest.mark.skipif(not cupy_standin.installed(), reason="counting reads needs the CuPy stand-in")

# a real GPU rounds differently (cuBLAS, reduction order); the stand-in is NumPy, so exact there
LOSS_RTOL = 0 if cupy_standin.installed() else 1e-4


@pytest.fixture(scope="module")
def runs(workdir):
    """The same 8-step run (seed 3) on each backend: {backend: out dir}. The NumPy run takes the
    NumPy path (no CPU kernels): that is the code the stand-in runs, so the two agree exactly."""
    out = {}
    with pytest.MonkeyPatch.context() as mp, tt.kernels.numpy_only():
        mp.setattr(gpt.data, "DEFAULT_DATA_DIR", workdir[0] / "data")
        mp.setattr(trainer.Trainer, "_plot", lambda self: None)
        for backend in ("numpy", "cupy"):
            out[backend] = workdir[0] / backend
            assert train(workdir[1], out[backend], "--backend", backend, "--max-iters", 8, "--eval-interval", 4,
                         "--seed", 3) == 0
    return out


def test_training_on_cupy_gives_numpys_losses_and_weights(runs):
    (steps_np, evals_np), (steps_cp, evals_cp) = read_metrics(runs["numpy"]), read_metrics(runs["cupy"])
    assert [r["step"] for r in steps_cp] == list(range(1, 9)) and [r["step"] for r in evals_cp] == [0, 4, 8]
    assert [r["loss"] for r in steps_cp] == pytest.approx([r["loss"] for r in steps_np], rel=LOSS_RTOL)
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in evals_cp] == pytest.approx([r[key] for r in evals_np], rel=LOSS_RTOL)
    (t_np, meta_np), (t_cp, meta_cp) = (load_checkpoint(runs[b] / "ckpt.safetensors") for b in ("numpy", "cupy"))
    assert meta_cp["train_config"]["backend"] == "cupy" and set(t_cp) == set(t_np)
    for name in t_np:  # weights and AdamW moments, written from device arrays
        if cupy_standin.installed():
            np.testing.assert_array_equal(t_cp[name], t_np[name], err_msg=name)
        else:
            np.testing.assert_allclose(t_cp[name], t_np[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_resume_on_cupy_is_exact_with_dropout(workdir, tmp_path):
    """12 steps in one go == 6 steps, then --resume to 12, with dropout masks drawn on the device.
    Evaluations (and saves) every 4 steps: step 6 is a save point of the second run only."""
    common = ("--backend", "cupy", "--dropout", 0.1, "--lr-decay-iters", 12, "--eval-interval", 4, "--seed", 5)
    a, b, no_dropout = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train(workdir[1], a, "--max-iters", 12, *common) == 0
    assert train(workdir[1], b, "--max-iters", 6, *common) == 0
    assert train_cli.main(["--resume", "--max-iters", "12", "--out-dir", str(b)]) == 0
    (steps_a, evals_a), (steps_b, evals_b) = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in steps_b] == list(range(1, 13))
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]  # exactly
    by_step = {r["step"]: (r["val_loss"], r["train_loss"]) for r in evals_b}  # b also evaluated at 6
    assert [r["step"] for r in evals_a] == [0, 4, 8, 12]
    assert [(r["val_loss"], r["train_loss"]) for r in evals_a] == [by_step[r["step"]] for r in evals_a]
    (ta, meta_a), (tb, meta_b) = load_checkpoint(a / "ckpt.safetensors"), load_checkpoint(b / "ckpt.safetensors")
    assert meta_b["train_config"]["backend"] == "cupy" and meta_a["rng"] == meta_b["rng"]
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    # and dropout was on: without it the first step's loss (same weights, same batch) differs
    assert train(workdir[1], no_dropout, "--max-iters", 1, "--backend", "cupy", "--seed", 5) == 0
    assert read_metrics(no_dropout)[0][0]["loss"] != steps_a[0]["loss"]


def sample(checkpoint, *args):
    out = io.StringIO()
    rc = sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", "KING HENRY:\nThe", "--max-new-tokens", "40",
                          *map(str, args)], out=out)
    assert rc == 0
    return out.getvalue()


@pytest.mark.parametrize("trained_on", ["numpy", "cupy"])
def test_sampling_on_cupy_gives_numpys_text(runs, trained_on):
    ckpt = runs[trained_on] / "ckpt.safetensors"
    greedy = sample(ckpt, "--temperature", 0)
    assert greedy.startswith("KING HENRY:\nThe") and len(greedy) == len("KING HENRY:\nThe") + 40 + 1
    for backend in ("numpy", "cupy"):
        for cache in ((), ("--no-kv-cache",)):
            assert sample(ckpt, "--backend", backend, "--temperature", 0, *cache) == greedy, (backend, cache)
    # sampling draws on the host from its own seeded generator: the same seed, the same text
    seeded = [sample(ckpt, "--backend", b, "--seed", 7, "--temperature", 0.8, *cache)
              for b in ("numpy", "cupy") for cache in ((), ("--no-kv-cache",))]
    assert len(set(seeded)) == 1


# -- reads back from the GPU per training step -------------------------------------------------------------------
def tiny_model(dropout=0.1):
    tt.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=dropout)).to("cupy")
    return model, model.configure_optimizers(0.1, 1e-3)


@standin_only
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_training_step_reads_back_twice(grad_accum):
    """The loss (once, however many micro-batches) and the gradient norm for clipping: nothing else
    (no per-parameter norm, no target check, no boolean mask)."""
    model, opt = tiny_model()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 11, (4, 9)) for _ in range(4)]
    trainer.train_step(model, opt, batches[0][:, :-1], batches[0][:, 1:], 1e-3, grad_accum, 1.0)  # builds buffers
    with cupy_standin.count_syncs() as syncs:
        for b in batches[1:]:
            loss = trainer.train_step(model, opt, b[:, :-1], b[:, 1:], 1e-3, grad_accum, grad_clip=1.0)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert syncs.n <= 2 * 3, syncs
    assert [kind for kind, _ in syncs.events] == ["float()", "float()"] * 3, syncs


@standin_only
def test_the_programs_training_steps_read_back_at_most_twice(workdir, tmp_path, monkeypatch):
    """Counted around each Trainer.train_step of a gpt.train run (batches drawn, evaluations outside)."""
    per_step = []
    step = trainer.Trainer.train_step

    def counted(self):
        with cupy_standin.count_syncs() as syncs:
            result = step(self)
        per_step.append(syncs)
        return result

    monkeypatch.setattr(trainer.Trainer, "train_step", counted)
    assert train(workdir[1], tmp_path / "run", "--backend", "cupy", "--max-iters", 5, "--eval-interval", 5,
                 "--dropout", 0.1, "--grad-clip", 1.0) == 0
    assert len(per_step) == 5 and max(s.n for s in per_step) <= 2, per_step


@standin_only
@pytest.mark.parametrize("kv_cache", [True, False])
def test_decoding_reads_back_once_per_token(kv_cache):
    """The last position's logits go to the host sampler; the prompt's ids and positions are checked
    on the host, so nothing else is read back."""
    model, _ = tiny_model(dropout=0.0)
    with cupy_standin.count_syncs() as syncs:
        ids = model.generate(np.array([[1, 2, 3]]), 12, temperature=0.8, seed=1, kv_cache=kv_cache)
    assert ids.shape == (1, 15) and syncs.n == 12, syncs


# -- without CuPy: one clean error line (test_train's versions skip where the stand-in is the backend) ------------
def test_no_cupy_is_a_clean_error_in_both_programs(workdir, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setattr(tt.backend, "_cupy", None)
    assert train(workdir[1], tmp_path / "run", "--backend", "cupy", "--max-iters", 1) == 1
    rc = sample_cli.main(["--checkpoint", str(runs["numpy"] / "ckpt.safetensors"), "--backend", "cupy"],
                         out=io.StringIO())
    assert rc == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and all("pip install" in e and "--backend numpy" in e for e in errors), errors
