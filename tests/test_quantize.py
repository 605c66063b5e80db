"""Int8 weight-only quantization for sampling (gpt/quantize.py): per-row scales, the products on
both paths (the Numba kernel when installed, dequantizing by blocks otherwise) against the float
product, a quantized GPT close to its float self, and gpt.sample --quantize int8."""
from __future__ import annotations

import io

import numpy as np
import pytest

import gpt.quantize as Q
import tinytensor as tt
from tinytensor import kernels
from gpt import sample as sample_cli
from gpt import train as train_cli
from gpt import trainer
from gpt.model import GPT, GPTConfig
from textgen import make_text


@pytest.fixture(params=["kernel", "kernel-parallel", "blocks"])
def path(request, monkeypatch):
    """Each test on every product path: the kernel (tinytensor.kernels.quant) on one thread and
    split over the cores (skipped without Numba), and dequantizing by blocks (the kernels off)."""
    if request.param == "blocks":
        with kernels.numpy_only():
            yield request.param
        return
    pytest.importorskip("numba", reason="the int8 kernel needs numba (pip install numba)")
    if kernels.quant_module() is None:
        pytest.skip(f"kernels {kernels.reason()}")
    if request.param == "kernel-parallel":
        monkeypatch.setattr(kernels.quant_module(), "PARALLEL_MIN", 0)
    yield request.param


def test_rows_are_quantized_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 33)).astype(np.float32) * np.array([1e-3, 1, 10, 0, 1, 1, 1])[:, None]
    w = w.astype(np.float32)
    q, scale = Q.quantize_rows(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (7,)
    assert np.abs(q).max() == 127 and not q[3].any()  # each non-zero row uses the full range; a zero row stays 0
    err = np.abs(Q.dequantize_rows(q, scale) - w)
    assert (err <= scale[:, None] / 2 + 1e-7 * np.abs(w)).all()


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_matmul_equals_the_dequantized_product(path, rows):
    rng = np.random.default_rng(rows)
    q, scale = Q.quantize_rows(rng.standard_normal((1100, 96)).astype(np.float32))
    x = rng.standard_normal((2, rows, 96)).astype(np.float32)
    got = Q.int8_matmul(x, q, scale)
    want = x.astype(np.float64) @ Q.dequantize_rows(q, scale).astype(np.float64).T
    assert got.shape == (2, rows, 1100) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tie_head", [True, False])
def test_a_quantized_gpt_is_close_to_its_float_self(path, tie_head):
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64, tie_head=tie_head)
    tt.manual_seed(0)
    model = GPT(config)
    if not tie_head:
        model.lm_head.weight.data[...] = np.random.default_rng(1).normal(0, 0.02, (300, 64))
    idx = np.random.default_rng(2).integers(0, 300, (2, 24))
    with tt.no_grad():
        model.eval()
        ref, ref_loss = model(idx, idx)
        floats = Q.weight_bytes(model)
        Q.quantize_int8(model)
        got, loss = model(idx, idx)
    assert Q.weight_bytes(model) < 0.3 * floats
    assert not any(p.ndim == 2 and p.shape[0] > 32 for p in model.parameters())  # only wpe stays a float matrix
    diff = np.abs(got.numpy() - ref.numpy()).max()
    assert 0 < diff < 0.02 * np.abs(ref.numpy()).max()
    assert abs(loss.item() - ref_loss.item()) < 1e-3
    out = model.generate(idx[:1, :4], 6, temperature=0)  # the KV cache works with int8 layers
    assert out.shape == (1, 10)


def test_int8_on_each_backend_decodes_the_same(backend_name):
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tt.manual_seed(0)
    ref = Q.quantize_int8(GPT(config))
    tt.manual_seed(0)
    model = Q.quantize_int8(GPT(config).to(backend_name))
    prompt = np.array([[1, 2, 3]])
    assert model.generate(prompt, 5, temperature=0).tolist() == ref.generate(prompt, 5, temperature=0).tolist()


def test_sample_cli_quantize_int8(tmp_path, monkeypatch, capsys):
    import gpt.data
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(trainer.Trainer, "_plot", lambda self: None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "run"
    assert train_cli.main(["--preset", "tiny", "--input", str(corpus), "--out-dir", str(out), "--max-iters", "2",
                           "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
                           "--progress", "false"]) == 0
    capsys.readouterr()
    text = io.StringIO()
    assert sample_cli.main(["--checkpoint", str(out / "ckpt.safetensors"), "--quantize", "int8", "--prompt", "the",
                            "--max-new-tokens", "12"], out=text) == 0
    assert text.getvalue().startswith("the") and len(text.getvalue()) == 3 + 12 + 1
    assert "int8 weights:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main(["--quantize", "int4"])


@pytest.mark.parametrize("blocks", [1, 3, 12])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_int8_kernel_applies_row_and_block_scales(monkeypatch, blocks, parallel):
    """tinytensor.kernels.quant.int8_matmul against the dequantized float64 product, with one scale
    per row (gpt.quantize) and per block of inputs (ops.quant's QLoRA bases), 1 and 8 rows of x,
    on one thread and split over the cores; a row count that no chunk size divides."""
    quant = kernels.quant_module()
    if quant is None:
        pytest.skip(f"kernels {kernels.reason()}")
    if parallel:
        monkeypatch.setattr(quant, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(blocks)
    q = rng.integers(-127, 128, (1037, 96), dtype=np.int8)
    scale = rng.random((1037, blocks), dtype=np.float32) + np.float32(0.01)
    w = (q.reshape(1037, blocks, -1).astype(np.float64) * scale[..., None]).reshape(1037, 96)
    for rows in (1, quant.MAX_ROWS):
        x = rng.standard_normal((rows, 96)).astype(np.float32)
        out = np.full((rows, 1037), np.nan, np.float32)
        quant.int8_matmul(x, q, scale, out)
        np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-3)


def test_a_built_model_holds_the_read_arrays_not_a_random_copy():
    """Pretrained.build builds the layers uninitialised (nn.skip_init) and adopts the arrays read:
    same logits as the model they came from, no random draw taken, and no copy made."""
    from gpt.pretrained import Pretrained

    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tt.manual_seed(3)
    model = GPT(config)
    read = {k: v.copy() for k, v in model.state_dict().items()}
    src = Pretrained("mem", "checkpoint", "gpt", config, None, {}, lambda: dict(read))
    state = tt.backend.rng().bit_generator.state
    built = src.build()
    assert tt.backend.rng().bit_generator.state == state  # nothing drawn: no random initialisation ran
    assert built.transformer.wte.weight.data is read["transformer.wte.weight"]  # adopted, not copied
    idx = np.arange(12)[None] % 40
    with tt.no_grad():
        model.eval(), built.eval()
        np.testing.assert_array_equal(built(idx)[0].numpy(), model(idx)[0].numpy())
    with tt.nn.skip_init():
        assert tt.nn.init_skipped()
    assert not tt.nn.init_skipped()


@pytest.mark.parametrize("tie_head", [True, False])
def test_load_int8_quantizes_while_reading_to_the_same_arrays(tie_head):
    """load_int8 converts each matrix as it is read (the float model never exists) and ends with the
    same int8 arrays, and logits, as quantizing the built float model."""
    from gpt.pretrained import Pretrained

    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_head=tie_head)
    tt.manual_seed(4)
    state = {k: v.copy() for k, v in GPT(config).state_dict().items()}
    if not tie_head:
        state["lm_head.weight"] = np.random.default_rng(5).normal(0, 0.02, (50, 32)).astype(np.float32)
    seen = []

    def read(convert=None):
        out = {k: v.copy() for k, v in state.items()}
        if convert is None:
            return out
        seen.extend(k for k in out)
        return {k: convert(k, out.pop(k)) for k in list(out)}
    src = Pretrained("mem", "checkpoint", "gpt", config, None, {}, read)
    streamed, built = Q.load_int8(src), Q.quantize_int8(src.build())
    assert len(seen) == len(state)  # each tensor went through the converter
    a, b = streamed.transformer.h[1].mlp.c_fc, built.transformer.h[1].mlp.c_fc
    assert isinstance(a, Q.Int8Linear)
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    idx = np.arange(10)[None]
    with tt.no_grad():
        np.testing.assert_array_equal(streamed(idx)[0].numpy(), built(idx)[0].numpy())
    assert Q.weight_bytes(streamed) == Q.weight_bytes(built)
