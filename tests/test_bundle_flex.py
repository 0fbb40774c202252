"""Bundles that flex: several sizes in one bundle, long weighted prompts, LoRA packs patched in at load. Micro
model of export_cases.py; the fp16 / int8 bundles are the fp32 ones with each file quantized as the exporter
quantizes it (export/quantize.py), so each precision costs no conversion."""
import json
import shutil

import numpy as np
import pytest
import torch

from export_cases import BUNDLE_OPTIONS, PROMPT, SIZES, micro_pipeline, needs_litert, psnr, session_bundle
from lora_cases import kohya_state, own_factors, save
from mobilediffusion.errors import ConfigError, MobileDiffusionError
from mobilediffusion.export.flatbuffer import constant_bytes
from mobilediffusion.runtime import BundleError, BundlePipeline

pytestmark = [needs_litert, pytest.mark.slow]

LONG = "a (red:1.3) circle on blue, " + "with a ((thin)) white outline " * 14 + "and \\(no\\) shadow"


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """The session bundle: euler_ancestral 2 steps, CFG 2.5, two sizes, prompts of up to 2 chunks."""
    return session_bundle(tmp_path_factory)


def torch_reference(prompt, negative, seed, size):
    """The torch pipeline (its own text encoder: long prompts, weights) on the runtime's seeded numpy noise."""
    from mobilediffusion.export.endtoend import torch_reference as reference
    from mobilediffusion.export.schedule import sampler_section

    pipe = micro_pipeline()
    o = BUNDLE_OPTIONS
    section = sampler_section(pipe.config, o["sampler"], o["steps"], o["guidance"])
    f = pipe.config.decoder.upscale
    return reference(pipe, section, batch=1, latent_shape=[1, 4, size[0] // f, size[1] // f], prompt=prompt,
                     negative=negative, seed=seed)


# --------------------------------------------------------------------------- several sizes
def test_multi_size_bundle(multi, lora_bundles):
    """One UNet and one decoder file with a signature per size (and context length) over shared weights: each
    size's image equals torch's, the default size's equals a one-size, one-chunk bundle's; a size the bundle
    lacks is one error naming the sizes it has."""
    single = lora_bundles["plain"]
    m = json.loads((multi / "manifest.json").read_text())
    assert m["image"]["sizes"] == [list(s) for s in SIZES] and m["tokenizer"]["max_chunks"] == 2
    unet = m["components"]["unet"]
    assert [(s["size"], s["tokens"]) for s in unet["signatures"]] == [
        ([32, 24], 77), ([32, 24], 154), ([24, 32], 77), ([24, 32], 154)]
    assert [s["size"] for s in m["components"]["decoder"]["signatures"]] == [[32, 24], [24, 32]]
    for name in ("text_encoder", "unet", "decoder"):
        one, many = single / f"{name}.tflite", multi / f"{name}.tflite"
        weights, shared = constant_bytes(one), constant_bytes(many)
        print(f"{name}: one size and chunk {one.stat().st_size} B -> two sizes and chunks {many.stat().st_size} B "
              f"({many.stat().st_size / one.stat().st_size:.2f}x); constants {weights} -> {shared} B (the rest is each "
              "signature's graph, which the micro model's tiny weights do not outweigh)")
        assert shared - weights <= 0.01 * weights  # the signatures share every weight (+ a few shape constants)
    pipe, plain = BundlePipeline(multi), BundlePipeline(single)
    assert pipe.sizes == SIZES
    for size in SIZES:
        got = pipe(PROMPT, "blurry", seed=4, height=size[0], width=size[1])
        assert got.shape == (1, *size, 3)
        value = psnr(got, torch_reference(PROMPT, "blurry", 4, size))
        print(f"{size[1]}x{size[0]}: bundle vs torch PSNR {value:.1f} dB")
        assert value >= 45
    same = psnr(pipe(PROMPT, "blurry", seed=4), plain(PROMPT, "blurry", seed=4))
    print(f"default size: two-size bundle vs one-size bundle PSNR {same:.1f} dB")
    assert same >= 45
    with pytest.raises(BundleError, match=r"no 64x64 \(width x height\) signature; it holds 24x32, 32x24"):
        pipe(PROMPT, height=64, width=64)


def test_long_weighted_prompt_in_the_bundle(multi, caplog):
    """A 2-chunk prompt with emphasis against a 1-chunk negative one (the guided batch repeats it): the bundle's
    image equals torch's; a prompt longer than the bundle's chunks is cut with a warning naming the limit."""
    pipe = BundlePipeline(multi)
    ids, _ = pipe.tokenizer.chunks(LONG)
    assert len(ids) == 2
    got = pipe(LONG, "blurry", seed=2)
    value = psnr(got, torch_reference(LONG, "blurry", 2, SIZES[0]))
    print(f"2-chunk weighted prompt: bundle vs torch PSNR {value:.1f} dB")
    assert value >= 45
    weighted, plain = pipe.encode(LONG), pipe.encode(LONG.replace("(red:1.3)", "red"))
    assert weighted.shape == (1, 154, 32) and np.abs(weighted - plain).max() > 1e-2  # the weight is applied
    with caplog.at_level("WARNING", logger="mobilediffusion.prompts"):
        pipe(LONG * 2, seed=2)
    assert any("more than the 2 this model takes" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- LoRA packs
@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two kohya LoRAs for the micro model: A on every weight, B on the attention and MLP only."""
    pipe = micro_pipeline()
    folder = tmp_path_factory.mktemp("loras")
    a = save(kohya_state(own_factors(pipe, seed=1, scale=0.3), alpha=1.0), folder / "a.safetensors")
    b = save(kohya_state(own_factors(pipe, seed=2, scale=0.3, keep=lambda c, n: "attn" in n or "mlp" in n),
                         alpha=2.0), folder / "b.safetensors")
    return a, b


@pytest.fixture(scope="module")
def lora_bundles(tmp_path_factory, loras, plugin):
    """fp32 bundles of the micro model with the session bundle's sampler at its default size and one chunk: "plain"
    exported by the Export TFLite Bundle node with loras_as_packs from a model carrying A at 0.7 (so the model
    without it, and loras/a.lorapack), "a" with A baked in at 0.7, "ab" with A at 0.7 and B at -0.5 baked in."""
    import importlib
    import os

    from export_cases import MICRO, with_trained_norms

    from mobilediffusion.export import export_bundle
    from mobilediffusion.lora import with_lora

    a, b = loras
    pipe = micro_pipeline()
    root = tmp_path_factory.mktemp("lora-bundles")
    options = {**BUNDLE_OPTIONS, "sizes": SIZES[:1], "prompt_chunks": 1, "make_zip": False, "verify": False}
    # the node works on the plugin's own package copy (ComfyUI imports the repository as a package of its own)
    own = lambda name: importlib.import_module(f"{plugin.__name__}.{name}")  # noqa: E731
    base = own("mobilediffusion.pipeline").build_pipeline(MICRO, seed=3)
    with_trained_norms(base.unet, base.text_encoder, base.decoder)  # = micro_pipeline(), in the plugin's classes
    styled = own("mobilediffusion.lora").with_lora(base, a, 0.7)
    common = own("nodes._common")
    handles = (common.UNetHandle(styled.unet, styled.config, "micro"), styled.text_encoder,
               common.DecoderHandle(styled.decoder, styled.config.latent_scale, styled.config.latent_shift, "micro"))
    cwd = os.getcwd()
    os.chdir(root)  # outside ComfyUI the node writes ./output/mobilediffusion
    try:
        summary = own("nodes.export").ExportTFLiteBundle().export(
            *handles, "plain", precision="fp32", width=24, height=32, steps=2, sampler_name="euler_ancestral", cfg=2.5,
            batch_size=1, components="all", overwrite=False, make_zip=False, end_to_end_check=False, prompt_chunks=1,
            loras_as_packs=True)
    finally:
        os.chdir(cwd)
    return {"plain": root / "output" / "mobilediffusion" / "plain", "summary": summary["ui"]["text"],
            "a": export_bundle(with_lora(pipe, a, 0.7), root / "a", **options),
            "ab": export_bundle(with_lora(with_lora(pipe, a, 0.7), b, -0.5), root / "ab", **options)}


def at_precision(bundle, precision, dest):
    """A copy of an fp32 bundle with each file quantized as the exporter does (names and graph kept)."""
    from mobilediffusion.export.quantize import quantize
    from mobilediffusion.runtime.manifest import sha256_file

    dest = shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("loras"))
    if precision == "fp32":
        return dest
    m = json.loads((dest / "manifest.json").read_text())
    for name, e in m["components"].items():
        path = dest / e["file"]
        quantize(bundle / e["file"], path, precision, name)
        e.update(precision=precision, sha256=sha256_file(path), bytes=path.stat().st_size)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize("precision,limit", [("fp32", 100.0), ("fp16", 45.0), ("int8_weight_only", 30.0)])
def test_pack_equals_baked_lora(lora_bundles, loras, tmp_path, precision, limit):
    """A pack at strength s equals the bundle with the LoRA baked in at s; two packs at once equal both baked;
    strength 0 is the plain bundle bit for bit; a strength change is a re-patch."""
    import time

    from mobilediffusion.export.lora_pack import export_lora_pack

    a, b = loras
    plain, baked, both = (at_precision(lora_bundles[k], precision, tmp_path / k) for k in ("plain", "a", "ab"))
    pack_a = export_lora_pack(a, plain)
    pack_b = export_lora_pack(b, plain)
    assert pack_a == plain / "loras" / "a.lorapack"
    index = json.loads((plain / "loras" / "index.json").read_text())
    assert [p["file"] for p in index["packs"]] == ["a.lorapack", "b.lorapack"]
    pipe = BundlePipeline(plain)
    image = pipe(PROMPT, seed=5)
    t0 = time.perf_counter()
    pipe.set_loras([(pack_a, 0.7)])
    patch_s = time.perf_counter() - t0
    one = psnr(pipe(PROMPT, seed=5), BundlePipeline(baked)(PROMPT, seed=5))
    pipe.set_loras([(pack_a, 0.7), (pack_b, -0.5)])
    two = psnr(pipe(PROMPT, seed=5), BundlePipeline(both)(PROMPT, seed=5))
    off = psnr(image, BundlePipeline(baked)(PROMPT, seed=5))
    print(f"{precision}: pack {pack_a.stat().st_size} B, patch {patch_s * 1000:.0f} ms; pack vs baked {one:.1f} dB, "
          f"two packs vs both baked {two:.1f} dB (without the LoRA: {off:.1f} dB)")
    assert one >= limit and two >= limit and off < 30
    pipe.set_loras([(pack_a, 0.0)])
    assert np.array_equal(pipe(PROMPT, seed=5), image)


def test_pack_refusals(lora_bundles, loras, tmp_path):
    """Another bundle's pack, a damaged pack, a LoRA file given as a pack, a strength out of range, a LoRA for
    another model, DoRA, int8_a16: one clear error each, and the bundle keeps running as it was."""
    from mobilediffusion.export.lora_pack import export_lora_pack
    from mobilediffusion.lora.files import read_lora

    a, _ = loras
    plain, other = at_precision(lora_bundles["plain"], "fp32", tmp_path / "plain"), lora_bundles["a"]
    pack = export_lora_pack(a, plain, tmp_path / "a.lorapack")
    pipe = BundlePipeline(plain, loras=[(pack, 0.5)])
    before = pipe(PROMPT, seed=1)
    with pytest.raises(BundleError, match=r"made for another bundle: its (text_encoder|unet) file has sha256"):
        pipe.set_loras([(export_lora_pack(a, other, tmp_path / "other.lorapack"), 1.0)])
    damaged = tmp_path / "damaged.lorapack"
    damaged.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    with pytest.raises(BundleError, match="is not a readable LoRA pack"):
        pipe.set_loras([(damaged, 1.0)])
    with pytest.raises(BundleError, match="is not a LoRA pack for a bundle .* export-lora"):
        pipe.set_loras([(a, 1.0)])
    with pytest.raises(ConfigError, match="out of range"):
        pipe.set_loras([(pack, 1e9)])
    assert np.array_equal(pipe(PROMPT, seed=1), before)  # nothing half-patched: still A at 0.5
    # making packs
    with pytest.raises(ConfigError, match=r"ends in \.lorapack"):
        export_lora_pack(a, plain, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="already exists"):
        export_lora_pack(a, plain, pack)
    sd15_lora = save(kohya_state({("unet", "down_blocks.0.attentions.0.proj_in"): (torch.ones(320, 4),
                                                                                      torch.ones(4, 320))}),
                     tmp_path / "sd15.safetensors")
    with pytest.raises(MobileDiffusionError, match="another (base )?model"):
        export_lora_pack(sd15_lora, plain, tmp_path / "sd15.lorapack")
    dora = kohya_state(own_factors(micro_pipeline(), seed=3, keep=lambda c, n: "to_q" in n), alpha=1.0)
    key = next(k for k in dora if k.endswith(".lora_down.weight"))
    outputs = dora[key.replace(".lora_down.", ".lora_up.")].shape[0]
    dora[key.replace(".lora_down.weight", ".dora_scale")] = torch.ones(outputs, 1)
    with pytest.raises(ConfigError, match="DoRA"):
        export_lora_pack(save(dora, tmp_path / "dora.safetensors"), plain, tmp_path / "dora.lorapack")
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "dora.lorapack").exists()
    assert read_lora(a).name == "a.safetensors"


# --------------------------------------------------------------------------- memory budget
def test_budget_refusal_comes_before_any_conversion(monkeypatch, tmp_path):
    """A budget the chosen precision cannot meet (by the estimate, monkeypatched here) is refused before anything is
    converted, naming the best precision that fits; one nothing fits says what to shrink; a budget that cannot be
    read is one error."""
    import mobilediffusion.export.budget as budget
    import mobilediffusion.export.convert as convert
    from mobilediffusion.export import export_bundle

    monkeypatch.setattr(budget, "run_estimate", lambda sizes, precision, pixels, batch: {
        "fp32": 3e9, "fp16": 1.8e9, "int8_weight_only": 2.5e9, "int8_dynamic": 1.0e9}[precision])
    monkeypatch.setattr(convert, "convert", lambda *a, **k: pytest.fail("converted despite the budget"))
    pipe = micro_pipeline()
    with pytest.raises(ConfigError, match=r"at fp32 the bundle needs about 3.00 GB to run, over the budget of 2.00 GB .*"
                                          r"export it at fp16 \(about 1.80 GB\)"):
        export_bundle(pipe, tmp_path / "b", "fp32", budget="2GB")
    with pytest.raises(ConfigError, match=r"no precision fits \(the smallest, int8_dynamic, needs about 1.00 GB\)"):
        export_bundle(pipe, tmp_path / "b", "fp16", budget="500MB")
    for bad in ("2 bananas", "-1GB", "", "GB"):
        with pytest.raises(ConfigError, match="a memory budget is a size like 2GB"):
            export_bundle(pipe, tmp_path / "b", "fp16", budget=bad)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- LoRAs of a graph as packs
def test_split_loras_takes_them_off(loras, tmp_path):
    """What exporting "LoRAs as packs" exports: the model without its LoRAs. This package's merges come off bit for
    bit; a LoRA a ComfyUI graph merged (a bridge `source` chain) is subtracted to float32 rounding; one file at two
    strengths, or a DoRA, is refused by name."""
    from mobilediffusion.export.lora_pack import split_loras
    from mobilediffusion.lora import with_lora

    a, b = loras
    pipe = micro_pipeline()
    comfy = with_lora(pipe, b, -0.5)  # b merged as ComfyUI's LoraLoader merges it: plain weights to the bridge
    for module in (comfy.unet, comfy.text_encoder):
        del module._lora_state
        module.applied_loras = []
    chains = {socket: [{"node": "LoraLoader", "lora": "b.safetensors", "strength": -0.5}] for socket in ("model", "clip")}
    comfy.unet.source = comfy.text_encoder.source = chains  # what the bridge tells
    graph = with_lora(comfy, a, 0.7)  # then a by this package's LoRA node
    base, packs = split_loras(graph, resolve=lambda name: str(b) if name == "b.safetensors" else None)
    assert packs == [(str(a), 0.7), (str(b), -0.5)]
    for component in ("unet", "text_encoder"):
        ours, original = dict(getattr(base, component).named_parameters()), dict(getattr(pipe, component).named_parameters())
        worst = max(float((ours[n] - p).abs().max()) for n, p in original.items())
        print(f"{component}: largest difference from the model without LoRAs {worst:.1e}")
        assert worst <= 1e-6
        assert getattr(base, component).applied_loras == []
    only_a, packs = split_loras(with_lora(pipe, a, 0.7))
    assert packs == [(str(a), 0.7)]
    assert all(torch.equal(p, dict(pipe.unet.named_parameters())[n]) for n, p in only_a.unet.named_parameters())
    twice = with_lora(pipe.unet, a, 0.7)
    with pytest.raises(ConfigError, match="applied at 0.7 to the UNet and 0.3 to the text encoder; a pack has one"):
        split_loras(type(pipe)(pipe.config, twice, with_lora(pipe.text_encoder, a, 0.3), pipe.decoder))


def test_export_node_writes_loras_as_packs(lora_bundles):
    """Export TFLite Bundle with loras_as_packs (the "plain" bundle): a model with a LoRA (the MobileDiffusion LoRA
    node's) is exported without it, and the LoRA becomes <bundle>/loras/<name>.lorapack at its strength; run with
    the pack, the bundle equals the one exported with the LoRA baked in."""
    folder = lora_bundles["plain"]
    pack = folder / "loras" / "a.lorapack"
    assert any(f"LoRA pack: {pack}" in line and "strength 0.7" in line for line in lora_bundles["summary"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "loras" not in manifest["source"] and manifest["source"]["loras_as_packs"][0]["file"] == "a.safetensors"
    assert json.loads((folder / "loras" / "index.json").read_text())["packs"][0]["file"] == "a.lorapack"
    bundle, baked = BundlePipeline(folder), BundlePipeline(lora_bundles["a"])
    plain = bundle(PROMPT, seed=2)
    bundle.set_loras([(pack, 0.7)])
    value = psnr(bundle(PROMPT, seed=2), baked(PROMPT, seed=2))
    print(f"node export, LoRA as a pack at 0.7 vs baked: {value:.1f} dB")
    assert value >= 100 and psnr(plain, baked(PROMPT, seed=2)) < 30


def test_cli_export_lora_run_bundle_and_info(lora_bundles, loras, multi, tmp_path, capsys):
    """As typed: export-lora writes the pack into the bundle, run-bundle --lora PACK:S --size WxH draws with it,
    info lists the sizes, the prompt length and what one generation takes; bad input is one line, exit 2."""
    from PIL import Image

    from mobilediffusion.cli import main
    from mobilediffusion.runtime import to_pil

    a, _ = loras
    plain = at_precision(lora_bundles["plain"], "fp32", tmp_path / "plain")
    assert main(["export-lora", str(a), "--bundle", str(plain)]) == 0
    pack = plain / "loras" / "a.lorapack"
    assert f"wrote {pack}" in capsys.readouterr().out
    out = tmp_path / "styled.png"
    assert main(["run-bundle", str(plain), PROMPT, "-o", str(out), "--seed", "3", "--lora", f"{pack}:0.7"]) == 0
    expected = to_pil(BundlePipeline(plain, loras=[(pack, 0.7)])(PROMPT, seed=3))[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(["run-bundle", str(multi), PROMPT, "-o", str(tmp_path / "wide.png"), "--size", "32x24"]) == 0
    assert Image.open(tmp_path / "wide.png").size == (32, 24)
    capsys.readouterr()
    assert main(["info", str(multi)]) == 0
    info = capsys.readouterr().out
    assert "(24x32 + 32x24, batch 1, euler_ancestral 2 steps, guidance 2.5, prompts up to 150 tokens)" in info
    assert "in the interpreter:" in info and "one generation at 24x32:" in info and "4 signatures" in info
    for argv, message in ((["run-bundle", str(multi), PROMPT, "-o", str(out), "--size", "64x64"], "no 64x64"),
                          (["run-bundle", str(plain), PROMPT, "-o", str(out), "--lora", f"{pack}:500"], "out of range"),
                          (["run-bundle", str(plain), PROMPT, "-o", str(out), "--lora", str(a)], "not a LoRA pack"),
                          (["export-lora", str(a), "--bundle", str(plain)], "already exists"),
                          (["export", "-o", str(tmp_path / "x"), "--budget", "lots"], "a memory budget is a size"),
                          (["export", "-o", str(tmp_path / "x"), "--sizes", "64x64,big"], "--sizes takes WIDTHxHEIGHT")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
