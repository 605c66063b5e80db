"""``gpt.train --init-from PATH``: fine-tuning an existing checkpoint (ours here; Hugging Face GPT-2
folders in test_hf_gpt2.py). The model, its architecture and tokenizer come from the checkpoint,
the optimizer starts fresh, conflicting options are usage errors, and such a run resumes exactly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpt.data
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import load_checkpoint
from textgen import make_text


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A text, a data dir, and a tiny model trained 40 steps on it (made once for the module)."""
    root = tmp_path_factory.mktemp("init_from")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt.data, "DEFAULT_DATA_DIR", root / "data")
        mp.setattr(trainer.Trainer, "_plot", lambda self: None)
        assert train_cli.main(args(corpus, root / "base", "--max-iters", 40, "--tokenizer", "bpe",
                                   "--vocab-size", 300, "--learning-rate", 1e-2, "--warmup-iters", 2)) == 0
    return corpus, root / "base" / "ckpt.safetensors"


@pytest.fixture(autouse=True)
def _data_dir(base, tmp_path, monkeypatch):
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", tmp_path / "data")
    monkeypatch.delenv("GPT_DATA_DIR", raising=False)
    monkeypatch.setattr(trainer.Trainer, "_plot", lambda self: None)


def args(corpus, out_dir, *extra):
    return ["--preset", "tiny", "--input", str(corpus), "--out-dir", str(out_dir), "--eval-iters", "2",
            "--sample-tokens", "0", "--progress", "false", *map(str, extra)]


def weights(path):
    tensors, meta = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, meta


def test_init_from_loads_the_weights_and_tokenizer_with_a_fresh_optimizer(base, tmp_path):
    corpus, ckpt = base
    out = tmp_path / "ft"
    # learning rate 0: one step leaves the weights as loaded; the preset's shape options are ignored
    assert train_cli.main(args(corpus, out, "--init-from", ckpt, "--max-iters", 1, "--learning-rate", 0,
                               "--min-lr", 0, "--eval-interval", 1, "--preset", "shakespeare_char_cpu")) == 0
    got, meta = weights(out / "ckpt.safetensors")
    want, base_meta = weights(ckpt)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert meta["tokenizer"] == base_meta["tokenizer"]
    assert meta["model_config"] == base_meta["model_config"]
    assert meta["step"] == 1  # a new run: its own step count and a fresh optimizer (one step taken)
    assert {s["step"] for s in meta["optimizer"]["state"].values()} == {1}
    assert meta["train_config"]["init_from"] == str(ckpt)


def test_init_from_trains_from_the_checkpoints_loss(base, tmp_path):
    corpus, ckpt = base
    out = tmp_path / "ft"
    assert train_cli.main(args(corpus, out, "--init-from", ckpt, "--max-iters", 4, "--eval-interval", 4,
                               "--dropout", 0.1, "--block-size", 16)) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    _, base_meta = weights(ckpt)
    # the first evaluation is the checkpoint's model: near its last loss, far below a fresh model's (5.7)
    assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - base_meta["best_val_loss"]) < 0.15
    assert base_meta["best_val_loss"] < np.log(300) - 1
    _, meta = weights(out / "ckpt.safetensors")
    assert meta["model_config"]["block_size"] == 16 and meta["model_config"]["dropout"] == 0.1
    assert meta["model_config"]["n_embd"] == base_meta["model_config"]["n_embd"]


@pytest.mark.parametrize("extra, words", [
    (("--n-layer", 3), "--n-layer 3 differs"),
    (("--block-size", 64), "may only shrink"),
    (("--model", "bigram"), "--model bigram differs"),
    (("--tokenizer", "char"), "--tokenizer char differs"),
    (("--vocab-size", 512), "--vocab-size"),
])
def test_init_from_refuses_conflicting_architecture(base, tmp_path, capsys, extra, words):
    corpus, ckpt = base
    out = tmp_path / "ft"
    assert train_cli.main(args(corpus, out, "--init-from", ckpt, *extra)) == 2
    err = capsys.readouterr().err
    assert words in err and "--init-from" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the out-dir was made


def test_init_from_a_missing_or_bad_file(base, tmp_path, capsys):
    corpus, _ = base
    assert train_cli.main(args(corpus, tmp_path / "ft", "--init-from", tmp_path / "nope.safetensors")) == 1
    assert "--init-from" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert train_cli.main(args(corpus, tmp_path / "ft", "--init-from", junk)) == 1
    assert not (tmp_path / "ft").exists()


def test_gpt2_tokenizer_needs_a_model(base, tmp_path, capsys):
    corpus, _ = base
    with pytest.raises(SystemExit) as exc:
        train_cli.main(args(corpus, tmp_path / "ft", "--tokenizer", "gpt2"))
    assert exc.value.code == 2 and "--init-from" in capsys.readouterr().err


def test_init_from_run_resumes_exactly(base, tmp_path):
    """8 steps in one go == 4 steps, then --resume to 8 (its prepared data deleted in between, so
    the text is tokenized again with the checkpoint's tokenizer)."""
    corpus, ckpt = base
    common = ("--init-from", ckpt, "--lr-decay-iters", 8, "--eval-interval", 4, "--learning-rate", 3e-4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_cli.main(args(corpus, a, "--max-iters", 8, *common)) == 0
    assert train_cli.main(args(corpus, b, "--max-iters", 4, *common)) == 0
    shutil.rmtree(tmp_path / "data")
    assert train_cli.main(["--resume", "--max-iters", "8", "--out-dir", str(b), "--input", str(corpus),
                           "--progress", "false"]) == 0
    ta, meta_a = load_checkpoint(a / "ckpt.safetensors")
    tb, meta_b = load_checkpoint(b / "ckpt.safetensors")
    assert meta_a["step"] == meta_b["step"] == 8
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert meta_a["data"] == meta_b["data"]
