"""`mobilediffusion bench`: runs on the tiny preset with --json, measures what it says, refuses bad requests."""
import json

import pytest
import torch
from torch import nn

from mobilediffusion import bench, cli, fast

FAST = ["--runs", "1", "--warmup", "0", "--size", "64"]


def run_cli(capsys, *argv):
    code = cli.main(["bench", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_bench_tiny_json(capsys):
    pytest.importorskip("diffusers")
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--json", *FAST)
    assert code == 0
    result = json.loads(out)
    rows = {r["component"]: r for r in result["rows"]}
    assert set(rows) == {"text", "unet", "decoder"}
    for r in rows.values():
        assert r["preset"] == "tiny" and r["precision"] == "fp32" and r["mode"] == "eager"
        assert r["ms"] > 0 and r["gflop"] > 0
        assert r["gflops"] == pytest.approx(r["gflop"] / r["ms"] * 1e3)
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / result["machine"]["peak"]["fp32"]["gflops"])
    # diffusers cannot express the MobileDiffusion UNet layout: no reference, and the row says why
    assert rows["unet"]["ref_ms"] is None and "diffusers cannot express" in rows["unet"]["note"]
    # the lite decoder is a diffusers AutoencoderKL: timed against it on the same weights, equal outputs
    dec = rows["decoder"]
    assert dec["ref"] == "diffusers AutoencoderKL" and dec["ratio"] == pytest.approx(dec["ref_ms"] / dec["ms"])
    assert dec["rel_err"] <= 1e-5
    assert rows["text"]["rel_err"] <= 1e-5
    assert result["settings"]["latent"] == 8


def test_bench_text_table(capsys):
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--components", "unet",
                           "--no-reference", *FAST)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["preset", "component", "mode", "ms"]
    assert lines[1].split()[:3] == ["tiny", "unet", "fp32"]
    assert lines[-1].startswith("peak on ")


def test_unknown_preset_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "--preset", "sd99", *FAST)
    assert code == 2 and out.strip() == ""
    assert "unknown preset 'sd99'" in err and "tiny" in err  # lists the known ones


def test_unavailable_precision_is_a_clear_error(capsys):
    missing = [p for p in ("bf16", "fp16") if fast.unsupported_precision(p) is not None]
    if not missing:
        pytest.skip("this machine runs every precision bench knows")
    code, out, err = run_cli(capsys, "--preset", "tiny", "--precision", missing[-1], *FAST)
    assert code == 2 and out.strip() == ""
    assert f"precision {missing[-1]} is not available on cpu" in err and "use fp32" in err


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--components", "vae"], "unknown component 'vae'"),
    (["--size", "100"], "multiple of 8"),
])
def test_other_bad_requests(capsys, argv, message):
    code, _, err = run_cli(capsys, "--preset", "tiny", *argv)
    assert code == 2 and message in err


def test_flop_count_and_alternating_timer():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    assert bench.count_gflop(lambda: lin(x)) == pytest.approx(2 * 8 * 32 * 16 / 1e9)
    calls = []
    ms = bench.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=1)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order reversed every other round


def test_peak_probe():
    peak = bench.measure_peak(torch.float32, runs=1)
    assert peak["gflops"] > 0 and peak["probe"] in peak["probes"]
    assert peak["gflops"] == max(peak["probes"].values()) or abs(peak["gflops"] - max(peak["probes"].values())) < 0.1


@pytest.mark.slow
def test_end_to_end_reports_time_and_peak_rss():
    r = bench.end_to_end("tiny", 1, 0.0, "onestep", "fp32", False, size=64)
    assert r["ms"] > 0 and r["peak_rss_mb"] > 50 and r["size"] == 64
