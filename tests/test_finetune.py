"""Fine-tuning: gradient checkpointing (tt.checkpoint), LoRA (frozen bases, quantized ones, merge,
adapter files as untrusted input), SFT data (response-only loss, JSONL validation), and the
programs' options (gpt.train --lora-rank/--sft-data/--grad-checkpoint, gpt.sample --adapter/--template)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F
from gpt import lora as L
from gpt import sample as sample_cli
from gpt import sft as S
from gpt import train as train_cli
from gpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gpt.generate import load_model
from gpt.pretrained import open_pretrained
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import CharTokenizer
from tinytensor.nn.lora import LoRALinear
from tinytensor.ops.quant import dequantize_blockwise, quantize_blockwise
from tinytensor.testing import check_grad

from test_train import corpus, read_metrics, train, train_args, workdir, _data_dir_and_no_plot  # noqa: F401

CFG = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(seed=0, B=3, T=16, V=23):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def grads_of(model, x, y, seed=5):
    tt.manual_seed(seed)  # the dropout masks
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: None if p.grad is None else p.grad.copy() for n, p in model.named_parameters()}


# -- gradient checkpointing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(dropout=0.2), dict(pos="rope", mlp="swiglu", dropout=0.1)])
def test_grad_checkpoint_gives_identical_gradients(options):
    """Bit for bit, dropout included (its masks are drawn again from the saved generator state),
    and the generator ends where it would without checkpointing."""
    x, y = batch()
    results = []
    for on in (False, True):
        tt.manual_seed(1)
        model = GPT(GPTConfig(**CFG, **options))
        model.grad_checkpoint = on
        loss, grads = grads_of(model, x, y)
        results.append((loss, grads, tt.backend.rng().random()))
    (loss_a, ga, after_a), (loss_b, gb, after_b) = results
    assert loss_a == loss_b and after_a == after_b
    for name in ga:
        np.testing.assert_array_equal(ga[name], gb[name], err_msg=name)


def test_grad_checkpoint_recomputes_every_block_but_the_last():
    """The last block's backward follows its forward at once: it is not checkpointed."""
    x, y = batch()
    model = GPT(GPTConfig(**{**CFG, "n_layer": 3}))
    model.grad_checkpoint = True
    _, loss = model(x, y)
    seen, stack, names = set(), [loss], []
    while stack:  # every node of the graph, once
        t = stack.pop()
        if t._ctx is None or id(t) in seen:
            continue
        seen.add(id(t))
        names.append(t._ctx.name)
        stack.extend(p for p in t._ctx.parents if isinstance(p, tt.Tensor))
    assert names.count("checkpoint") == 2


def test_checkpoint_gradcheck_and_graph():
    w = np.random.default_rng(0).standard_normal((4, 4))

    def fn(x, b):
        return tt.checkpoint(lambda u, v: F.gelu(u @ tt.tensor(w) + v).tanh(), x, b)
    check_grad(fn, np.random.default_rng(1).standard_normal((3, 4)), np.random.default_rng(2).standard_normal(4))
    x = tt.randn(2, 4, requires_grad=True)
    out = tt.checkpoint(lambda u: (u * u).sum(axis=1), x)
    assert out._ctx.name == "checkpoint" and out._ctx.parents == (x,)  # one node: nothing inside is kept
    with tt.no_grad():
        assert tt.checkpoint(lambda u: u * 2, x)._ctx is None
    with pytest.raises(TypeError, match="one Tensor"):
        tt.checkpoint(lambda u: (u, u), x)


def test_checkpoint_reaches_parameters_when_inputs_need_no_gradient():
    """A LoRA block's input comes from frozen embeddings: only the adapters inside want gradients."""
    layer = LoRALinear(tt.nn.Linear(4, 3), rank=2, alpha=2)
    layer.lora_B.data[...] = 1.0
    x = tt.randn(5, 4)
    tt.checkpoint(layer, x).sum().backward()
    expected_A = layer.lora_A.grad.copy()
    layer.lora_A.grad = layer.lora_B.grad = None
    layer(x).sum().backward()
    np.testing.assert_array_equal(layer.lora_A.grad, expected_A)


# -- LoRA -----------------------------------------------------------------------------------------------------
def test_lora_linear_matches_its_formula_and_freezes_the_base():
    rng = np.random.default_rng(0)
    base = tt.nn.Linear(6, 4)
    w, b = base.weight.data.copy(), base.bias.data.copy()
    layer = LoRALinear(base, rank=2, alpha=3)
    layer.lora_B.data[...] = rng.standard_normal((4, 2))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    out = layer(tt.tensor(x))
    A, B = layer.lora_A.data, layer.lora_B.data
    np.testing.assert_allclose(out.numpy(), x @ w.T + b + (x @ A.T @ B.T) * 1.5, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None  # no gradient computed for the base
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def lora_gpt(seed=0, **spec):
    tt.manual_seed(seed)
    model = GPT(GPTConfig(**CFG))
    spec = L.LoRASpec(**{"rank": 4, "alpha": 8.0, **spec})
    names = L.apply_lora(model, spec)
    for _, m in L.lora_layers(model):  # a trained-looking adapter (B starts at zero)
        m.lora_B.data[...] = tt.backend.rng().standard_normal(m.lora_B.shape) * 0.1
    return model, spec, names


@pytest.mark.parametrize("targets", list(L.TARGETS))
def test_lora_trains_only_the_adapters(targets):
    model, spec, names = lora_gpt(targets=targets)
    assert len(names) == CFG["n_layer"] * len(L.TARGETS[targets])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad} == \
        L.adapter_shapes(model.config, spec)
    opt = model.configure_optimizers(0.1, 1e-3)
    _, grads = grads_of(model, *batch())
    assert all(grads[n] is None for n, p in model.named_parameters() if not p.requires_grad)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    opt.step()
    state_ids = set(opt.state)
    assert state_ids == {id(p) for p in model.parameters() if p.requires_grad}  # no moments for the base
    for n, p in model.named_parameters():
        assert np.array_equal(before[n], p.data) != p.requires_grad, n


def test_merge_and_unmerge():
    model, _, _ = lora_gpt()
    x, _ = batch()
    model.eval()
    with tt.no_grad():
        unmerged = model(x)[0].numpy()
        weights = {n: p.data.copy() for n, p in model.named_parameters()}
        L.merge_lora(model)
        merged = model(x)[0].numpy()
        L.unmerge_lora(model)
        again = model(x)[0].numpy()
    assert not np.allclose(merged, GPT_logits_without_adapters(model, x), atol=1e-4)  # the adapters matter
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again, unmerged, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.data, weights[n], atol=1e-6, err_msg=n)


def GPT_logits_without_adapters(model, x):
    saved = [(m, m.lora_B.data.copy()) for _, m in L.lora_layers(model)]
    for m, _ in saved:
        m.lora_B.data[...] = 0
    out = model(x)[0].numpy()
    for m, b in saved:
        m.lora_B.data[...] = b
    return out


@pytest.mark.parametrize("bits,tol", [(8, 0.5 / 127), (4, 0.5 / 7)])
def test_quantize_blockwise_round_trip(bits, tol):
    w = np.random.default_rng(bits).standard_normal((6, 32)).astype(np.float32)
    w[0, :8] = 0.0  # an all-zero block
    q, scale = quantize_blockwise(w, bits, 8)
    assert q.dtype == (np.int8 if bits == 8 else np.uint8) and q.shape == (6, 32 if bits == 8 else 16)
    assert scale.shape == (6, 4) and scale.dtype == np.float32
    back = dequantize_blockwise(q, scale, bits, 8)
    absmax = np.abs(w.reshape(6, 4, 8)).max(axis=2, keepdims=True)
    err = np.abs(back - w).reshape(6, 4, 8)
    assert (err <= absmax * tol * (1 + 1e-5) + 1e-7).all()  # at most half a step of each block's grid
    assert (back[0, :8] == 0).all()
    # values on the grid come back exactly (the 4-bit packing loses nothing)
    np.testing.assert_array_equal(dequantize_blockwise(*quantize_blockwise(back, bits, 8), bits, 8), back)


@pytest.mark.parametrize("base_dtype", ["int8", "int4"])
def test_quantized_base_is_smaller_and_close(base_dtype):
    model, spec, _ = lora_gpt(base_dtype=base_dtype)
    ref, _, _ = lora_gpt()  # the same weights and adapters on a float32 base
    x, _ = batch()
    with tt.no_grad():
        err = np.abs(model(x)[0].numpy() - ref(x)[0].numpy()).max()
    assert 0 < err < (0.01 if base_dtype == "int8" else 0.1)
    layer = L.lora_layers(model)[0][1]
    n = layer.in_features * layer.out_features  # 16 inputs: one block of 16 per row, a float32 scale each
    per_weight = (1 if base_dtype == "int8" else 0.5) + 4 / 16
    assert layer.weight_q.data.nbytes + layer.weight_scale.data.nbytes == n * per_weight < 4 * n / 2.5


@pytest.mark.parametrize("base_dtype", ["float32", "int4"])
def test_adapter_file_round_trip(tmp_path, base_dtype):
    model, spec, _ = lora_gpt(base_dtype=base_dtype)
    path = tmp_path / "adapter.safetensors"
    L.save_adapter(path, model, spec)
    tensors, _ = load_checkpoint(path)
    assert set(tensors) == set(L.adapter_shapes(model.config, spec))  # the adapters only: small
    tt.manual_seed(0)
    base = GPT(GPTConfig(**CFG))  # the same base weights (same seed), no adapters
    assert L.load_adapter(base, path) == spec
    x, _ = batch()
    with tt.no_grad():
        np.testing.assert_array_equal(base(x)[0].numpy(), model(x)[0].numpy())


def tamper(path, tensors=None, meta=None):
    t, m = load_checkpoint(path)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_checkpoint(path, t, m)


@pytest.mark.parametrize("edit,message", [
    (dict(meta=lambda m: m.update(kind="other")), "kind"),
    (dict(meta=lambda m: m["lora"].update(rank=10**9)), "rank"),
    (dict(meta=lambda m: m["lora"].update(targets="everything")), "targets"),
    (dict(meta=lambda m: m["lora"].pop("alpha")), "alpha"),
    (dict(meta=lambda m: m["model_config"].update(n_embd=32)), "another shape"),
    (dict(tensors=lambda t: t.update({"transformer.h.0.attn.c_attn.lora_A": np.zeros((5, 16), np.float32)})),
     "wrong shapes"),
    (dict(tensors=lambda t: t.pop("transformer.h.1.attn.c_proj.lora_B")), "missing"),
    (dict(tensors=lambda t: t.update(extra=np.zeros(2, np.float32))), "unexpected"),
    (dict(tensors=lambda t: t["transformer.h.0.attn.c_attn.lora_B"].__setitem__((0, 0), np.nan)), "NaN"),
    (dict(tensors=lambda t: t.update({"transformer.h.0.attn.c_attn.lora_A": np.zeros((4, 16), np.int32)})),
     "non-float"),
])
def test_adapter_file_is_validated(tmp_path, edit, message):
    model, spec, _ = lora_gpt()
    path = tmp_path / "adapter.safetensors"
    L.save_adapter(path, model, spec)
    tamper(path, **edit)
    with pytest.raises(CheckpointError, match=message):
        L.load_adapter(GPT(GPTConfig(**CFG)), path)


# -- SFT data -------------------------------------------------------------------------------------------------------
TOKENIZER = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ABQ:\n?.")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_sft_loss_is_on_response_tokens_only(tmp_path):
    """The masked batch's loss equals a manual mean of -log p over the answers' tokens (and END)."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "say hi", "response": "hi there"},
                                              {"messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "a?"},
                                                            {"role": "assistant", "content": "b."},
                                                            {"role": "user", "content": "c?"},
                                                            {"role": "assistant", "content": "d"}]}])
    data = S.SFTData.load(path, TOKENIZER, block_size=64, val_fraction=0.0)
    rng = np.random.default_rng(0)
    x, y = data.batch("train", 4, rng)
    logits = np.random.default_rng(1).standard_normal(x.shape + (TOKENIZER.vocab_size,)).astype(np.float32)
    loss = F.cross_entropy(tt.tensor(logits), y).item()
    # manual: which targets are trained, from the rendered text itself
    manual, count = 0.0, 0
    for row in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[row, t] != S.IGNORE:
                lp = logits[row, t] - np.log(np.exp(logits[row, t]).sum())
                manual -= lp[y[row, t]]
                count += 1
    assert math.isclose(loss, manual / count, rel_tol=1e-5)
    # the trained targets spell the answers and their END, nothing of the prompts
    ids, trained = S.encode_example({"prompt": "say hi", "response": "hi there"}, TOKENIZER, 64)
    assert TOKENIZER.decode(ids[trained].tolist()) == " hi there\n\n"
    assert TOKENIZER.decode(ids.tolist()) == "Q: say hi\nA: hi there\n\n"
    ids, trained = S.encode_example(json.loads(path.read_text().splitlines()[1]), TOKENIZER, 64)
    assert TOKENIZER.decode(ids[trained].tolist()) == " b.\n\n d\n\n"


def test_sft_truncation_keeps_answer_tokens():
    ids, trained = S.encode_example({"prompt": "a" * 100, "response": "b" * 100}, TOKENIZER, 32)
    assert ids.size == 33 and 2 <= trained.sum() and trained[-1] and not trained[0]
    ids, trained = S.encode_example({"prompt": "a" * 100, "response": "b"}, TOKENIZER, 32)
    assert ids.size == 33 and TOKENIZER.decode(ids[trained].tolist()) == " b\n\n"


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: invalid JSON"),
    ('{"prompt": "a", "response": NaN}', "line 2: .*NaN"),
    ('{"prompt": "a", "prompt": "b", "response": "c"}', "line 2: .*twice"),
    ('{"prompt": "a"}', "line 2: expected the keys"),
    ('{"prompt": "a", "response": 3}', "line 2: 'response' must be a string"),
    ('{"prompt": "a", "response": ""}', "line 2: 'response' is empty"),
    ('["prompt", "response"]', "line 2: expected a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: turn 0 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: no non-empty assistant turn"),
    ('{"messages": [[[[["deep"]]]]]}', "line 2: JSON is nested"),
    ('{"prompt": "a", "response": "' + "b" * (S.MAX_LINE_BYTES + 1) + '"}', "line 2: .*bytes"),
])
def test_sft_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(S.SFTError, match=message):
        S.read_jsonl(path)


def test_sft_file_errors(tmp_path):
    with pytest.raises(S.SFTError, match="does not exist"):
        S.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(S.SFTError, match="no examples"):
        S.read_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "bytes.jsonl").write_bytes(b'{"prompt": "\xff", "response": "x"}\n')
    with pytest.raises(S.SFTError, match="line 1: not UTF-8"):
        S.read_jsonl(tmp_path / "bytes.jsonl")
    with pytest.raises(S.SFTError, match="is a directory; pass a .jsonl file"):
        S.read_jsonl(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # the shared bounded reader (gpt.files): never blocks on a FIFO
    with pytest.raises(S.SFTError, match="is not a regular file"):
        S.read_jsonl(tmp_path / "fifo")
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "\u00e9t\u00e9"}])
    with pytest.raises(S.SFTError, match="example 1: the model's tokenizer cannot encode it"):
        S.SFTData.load(path, TOKENIZER, 16)


# -- the programs ------------------------------------------------------------------------------------------------
@pytest.fixture
def sft_file(tmp_path, corpus):
    chars = sorted(set(corpus.read_text(encoding="utf-8")))
    words = "".join(c for c in chars if c.isalpha())[:6]
    rows = [{"prompt": f"{w} {w}", "response": w * 2} for w in words] * 3
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_lora_sft_run_resumes_exactly_and_samples(corpus, tmp_path, sft_file, capsys):
    """LoRA on an int4 base, SFT data, gradient checkpointing and dropout: 8 steps in one go
    equal 4 + 4 resumed; the adapter file applies to the base; --template wraps the prompt."""
    common = ("--lr-decay-iters", 8, "--eval-interval", 4, "--lora-rank", 2, "--lora-base", "int4",
              "--lora-dropout", 0.1, "--dropout", 0.1, "--grad-checkpoint", "--sft-data", sft_file,
              "--lora-targets", "all", "--tokenizer", "bpe", "--vocab-size", 260)  # bytes: the template's Q and A
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(corpus, a, "--max-iters", 8, *common) == 0
    assert "trainable parameters" in capsys.readouterr().err
    assert train(corpus, b, "--max-iters", 4, *common) == 0
    assert train_cli.main(["--resume", "--max-iters", "8", "--out-dir", str(b)]) == 2  # the SFT file not given
    assert "--sft-data" in capsys.readouterr().err
    assert train_cli.main(["--resume", "--max-iters", "8", "--out-dir", str(b), "--sft-data", str(sft_file)]) == 0
    assert [m["loss"] for m in read_metrics(a)[0]] == [m["loss"] for m in read_metrics(b)[0]]
    ta, meta = load_checkpoint(a / "ckpt.safetensors")
    tb, _ = load_checkpoint(b / "ckpt.safetensors")
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert meta["lora"]["base_dtype"] == "int4" and ta["transformer.h.0.attn.c_attn.weight_q"].dtype == np.uint8
    assert {k for k in ta if k.startswith("optimizer.")} and all(
        k.endswith((".exp_avg", ".exp_avg_sq")) for k in ta if k.startswith("optimizer."))
    n_opt = len({k.split(".")[1] for k in ta if k.startswith("optimizer.")})
    assert n_opt == 2 * 4 * 2  # lora_A and lora_B of 4 Linears in 2 blocks: nothing else has moments

    capsys.readouterr()
    out = io_out()
    assert sample_cli.main(["--checkpoint", str(a / "ckpt.safetensors"), "--prompt", "a", "--template", "qa",
                            "--max-new-tokens", "5", "--seed", "1"], out=out) == 0
    assert out.getvalue().startswith("Q: a\nA:")


def io_out():
    import io
    return io.StringIO()


def test_init_from_lora_and_the_adapter_on_its_base(corpus, tmp_path, capsys):
    """gpt.train --init-from BASE --lora-rank: the adapter file on BASE samples exactly what the
    run's own checkpoint does; --init-from that checkpoint starts from the merged model."""
    base, tuned, again = tmp_path / "base", tmp_path / "tuned", tmp_path / "again"
    assert train(corpus, base, "--max-iters", 2, "--eval-interval", 2) == 0
    assert train(corpus, tuned, "--max-iters", 3, "--eval-interval", 3, "--lora-rank", 2,
                 "--init-from", base / "ckpt.safetensors") == 0
    adapter = tuned / "adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size < 20_000
    x = np.arange(12)[None] % 7
    logits = [load_model(path, adapter=a)[0](x)[0].numpy() for path, a in (
        (tuned / "ckpt.safetensors", None), (base / "ckpt.safetensors", adapter), (base / "ckpt.safetensors", None))]
    # the adapter on its base: the run's own model (merged by the checkpoint reader on one side, folded
    # from the adapter file on the other: the same B A alpha/rank, whose BLAS product may round an ulp apart)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6, atol=1e-7)
    assert np.abs(logits[0] - logits[2]).max() > 1e-4  # (and it did change the base)
    out = io_out()
    assert sample_cli.main(["--checkpoint", str(base / "ckpt.safetensors"), "--adapter", str(adapter),
                            "--max-new-tokens", "5"], out=out) == 0 and len(out.getvalue()) > 5
    # --init-from the LoRA run's checkpoint: the base with its adapters merged (then trained in full)
    merged = open_pretrained(tuned / "ckpt.safetensors").build()
    np.testing.assert_allclose(merged(x)[0].numpy(), logits[0], rtol=1e-5, atol=1e-6)
    assert train(corpus, again, "--max-iters", 1, "--eval-interval", 1, "--init-from", tuned / "ckpt.safetensors") == 0
    # a training checkpoint is not an adapter file
    capsys.readouterr()
    assert sample_cli.main(["--checkpoint", str(base / "ckpt.safetensors"), "--adapter",
                            str(tuned / "ckpt.safetensors"), "--max-new-tokens", "1"], out=io_out()) == 1
    assert "not a usable LoRA adapter" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (("--lora-rank", -1), "lora-rank"),
    (("--lora-rank", 4, "--lora-alpha", 0), "alpha"),
    (("--lora-rank", 4, "--lora-dropout", 1.5), "dropout"),
    (("--lora-rank", 4, "--model", "bigram"), "bigram"),
    (("--lora-targets", "everything"), "lora-targets"),
    (("--lora-rank", 4, "--dtype", "float16"), "float32"),
])
def test_bad_finetune_options(corpus, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(train_args(corpus, tmp_path / "o", *args))
    if exc.value.code is None:  # pragma: no cover
        pytest.fail("accepted")
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_layer_equals_its_composed_form(dropout):
    """F.lora_linear (one primitive) against linear + dropout + two thin linears, same mask draws:
    outputs and every gradient."""
    tt.manual_seed(3)
    layer = LoRALinear(tt.nn.Linear(6, 5), rank=2, alpha=3.0, dropout=dropout)
    layer.lora_B.data[...] = np.random.default_rng(1).normal(size=layer.lora_B.shape)
    x0 = np.random.default_rng(2).normal(size=(2, 4, 6)).astype(np.float32)
    results = []
    for fused in (True, False):
        tt.manual_seed(7)
        x = tt.Tensor(x0, requires_grad=True)
        if fused:
            y = layer(x)
        else:
            h = F.dropout(x, dropout, True)
            y = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(h, layer.lora_A) * layer.scaling, layer.lora_B)
        (y * y).sum().backward()
        results.append([y.numpy(), x.grad.copy(), layer.lora_A.grad.copy(), layer.lora_B.grad.copy()])
        layer.lora_A.grad = layer.lora_B.grad = None
    assert layer.weight.grad is None
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
