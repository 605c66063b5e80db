"""The benchmarks run in quick mode, so they cannot rot. No timing is asserted
(timings belong in bench/RESULTS.md); only that they run and report sane fields."""
import math

import pytest

from bench import ops, sample, train_step


def test_train_step_quick_reports_fields():
    r = train_step.main(["--quick"])
    assert r["matmul_gflops"] > 0
    assert r["tinytensor"]["median_ms"] > 0 and 0 < r["tinytensor"]["mfu"] < 1.5
    assert r["tinytensor"]["peak_mb"] >= 0
    if "pytorch" in r:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0


def test_sample_quick_cache_matches_recompute():
    r = sample.main(["--quick"])
    assert r["identical"], "greedy KV-cache decoding must equal full recompute"
    assert r["kv_cache_tok_s"] > 0 and r["recompute_tok_s"] > 0


def test_ops_quick_runs():
    r = ops.main(["--quick"])
    assert set(r) >= {"linear c_fc", "gelu", "layer_norm", "attention", "cross_entropy", "embedding"}
    assert all(row["tinytensor_ms"] > 0 for row in r.values())


def test_step_flops_counts_parameters():
    cfg, batch = train_step.model_config("shakespeare_char_cpu")
    # 6 FLOPs per parameter per token dominate: at least that many
    n_params = cfg.n_layer * 12 * cfg.n_embd ** 2
    assert train_step.step_flops(cfg, batch) >= 6 * n_params * batch * cfg.block_size


@pytest.mark.parametrize("preset", ["tiny", "shakespeare_char_cpu"])
def test_model_config_matches_preset(preset):
    cfg, batch = train_step.model_config(preset)
    assert cfg.vocab_size == 65 and batch >= 1


def test_full_run_quick_trains_both_sides(tmp_path, monkeypatch):
    import gpt.data
    from bench import full_run
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", tmp_path / "data")
    rng = __import__("numpy").random.default_rng(0)
    words = "the king queen lord lady night day love hath thou shall come speak fair noble".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(400)) + "\n")
    r = full_run.main(["--quick", "--preset", "tiny", "--input", str(corpus)])
    assert r["tinytensor"]["wall_s"] > 0 and math.isfinite(r["tinytensor"]["val_loss"])
    if "pytorch" in r:
        # same batches, same recipe: the two should land close together
        assert abs(r["pytorch"]["val_loss"] - r["tinytensor"]["val_loss"]) < 0.5
