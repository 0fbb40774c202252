"""The decoder and load-time bench sections on tiny inputs: their rows and what they say when a peer is missing."""
import argparse

import pytest

from mobilediffusion.benchmarks import decoders, loading
from mobilediffusion.decoder import build_decoder
from mobilediffusion.presets import PRESETS

PEAKS = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 300.0}}


def test_decoder_rows_and_stages_add_up():
    rows = decoders.decoder_rows(["tiny"], ["fp32"], size=32, runs=1, warmup=0, stages=True, peaks=PEAKS,
                                 with_reference=False)
    assert [r["mode"] for r in rows] == ["nchw", "fast"]
    fast_row = rows[1]
    assert fast_row["rel_err"] <= 1e-5 and fast_row["shape"].endswith("(1, 3, 32, 32)")
    assert fast_row["truth"].startswith("ours nchw fp32")
    stages = fast_row["stages"]
    assert [s["stage"] for s in stages][:2] == ["post_quant_conv", "conv_in"]
    assert sum(s["gflop"] for s in stages) == pytest.approx(fast_row["gflop"], rel=1e-6)
    assert fast_row["ops"] and all(o["ms"] >= 0 for o in fast_row["ops"])
    lines = decoders.format_rows(rows)
    assert len(lines) == 1 + 2 + len(stages) + len(fast_row["ops"])


def test_taesd_segments_cover_every_layer():
    dec = build_decoder(PRESETS["sdxs-512"].decoder, device="meta")
    segs = decoders.segments(dec)
    assert [i for _, idx in segs for i in idx] == list(range(len(dec.layers)))
    assert segs[0][0] == "conv_in" and segs[-1][0].endswith("conv_out")


def test_load_rows_say_why_a_loader_is_skipped(tmp_path):
    assert "single files" in loading._why_skip("comfyui", "diffusers_folder", tmp_path, None)
    assert "not a ComfyUI folder" in loading._why_skip("comfyui", "single_file", tmp_path, None)
    assert "--comfyui" in loading._why_skip("comfyui", "single_file", None, None)
    rows = [{"layout": "single_file", "precision": "fp32", "loader": "ours", "cold_s": 2.0, "warm_s": 1.0,
             "rss_mb": 10.0, "model_dtype": "float32"},
            {"layout": "single_file", "precision": "fp32", "loader": "diffusers", "cold_s": 4.0, "warm_s": 3.0,
             "rss_mb": 10.0, "model_dtype": "float32"},
            {"layout": "single_file", "precision": "fp32", "loader": "comfyui", "skipped": "no ComfyUI folder"}]
    lines = loading.format_rows(rows)
    assert "3.00" in lines[2] and "(no ComfyUI folder)" in lines[3]


def test_bench_flags():
    from mobilediffusion import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--decoders", "--load", str("/nonexistent-parent/x")])
    assert args.decoders and decoders.enabled(args) and loading.enabled(args)
    from mobilediffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="parent folder does not exist"):
        loading.check(args)
