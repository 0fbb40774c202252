"""Section `control` (`bench --control`): one UNet step with a ControlNet, and one with a T2I-Adapter's residuals
(the adapter itself runs once per image and is timed apart), ours against diffusers' ControlNetModel /
T2IAdapter + UNet2DConditionModel on the same random weights, per SD-family preset and precision; with the
comfyui peer, the same steps in ComfyUI's native graph (ControlNetLoader's models applied as ControlNetApplyAdvanced
leaves them, then its BaseModel.apply_model: what KSampler runs), on the same weights written as the files a
ComfyUI user has (SD single file, LDM ControlNet, TencentARC T2I-Adapter). And what the default model's shipped
control plugin adds to a one-step image (`plugin` rows: one image with and without it, end to end in torch).

Ours runs the CPU fast path on the UNet and on the control models alike; diffusers runs eager, in the same
precision (and the error of every row is against diffusers in fp32).
"""
from __future__ import annotations

from ..presets import get_preset
from .measure import rel_err, time_alternating
from .models import diffusers_module, perturb


def add_arguments(parser) -> None:
    parser.add_argument("--control", action="store_true", help="also time a UNet step with a ControlNet and with a "
                        "T2I-Adapter against diffusers (SD-family presets; use --components none for this alone)")


def check(args) -> None:
    pass


def enabled(args) -> bool:
    return bool(getattr(args, "control", False))


def run(args, bench) -> dict:
    rows = plugin_rows(args, bench)
    diffusers = diffusers_module()
    if diffusers is None:
        bench.print("control: skipped, diffusers is not installed (pip install diffusers)")
        return {"control": rows}
    for preset in bench.presets:
        why = unsupported(get_preset(preset).unet)
        if why:
            bench.print(f"control {preset}: skipped, {why}")
            continue
        rows += preset_rows(preset, get_preset(preset).unet, args, bench, diffusers)
    return {"control": rows}


def unsupported(cfg) -> str | None:
    """Why diffusers' ControlNetModel cannot be built for this UNetConfig, or None."""
    from ..errors import ConfigError
    from ..weights.unet_keys import unet_config_to_diffusers

    if cfg.separable is not None and any(cfg.separable_flags):
        return "its UNet has separable convolutions, which diffusers' ControlNetModel cannot copy"
    try:
        unet_config_to_diffusers(cfg)
    except ConfigError as e:
        return f"diffusers cannot express this UNet ({e})"
    if not cfg.mid_block:
        return "diffusers' ControlNetModel needs a mid block"
    if len(set(cfg.layers_per_block)) != 1:
        return "diffusers' ControlNetModel takes one block count for every level"
    return None


def _diffusers_unet_kwargs(cfg) -> dict:
    """unet_config_to_diffusers with one block count (ControlNetModel.from_unet copies it and wants an int)."""
    from ..weights.unet_keys import unet_config_to_diffusers

    kwargs = unet_config_to_diffusers(cfg)
    if isinstance(kwargs.get("layers_per_block"), (list, tuple)):
        kwargs["layers_per_block"] = kwargs["layers_per_block"][0]
    return kwargs


def preset_rows(preset: str, unet_cfg, args, bench, diffusers) -> list:
    """The rows of one UNet layout (`unet_cfg`, named `preset`) in each of bench.precisions (fp32 first). One set
    of models per side is alive at a time (an SD1.5 UNet + ControlNet is ~5 GB a side in fp32): ours are built
    from diffusers' weights for each precision, and diffusers' are cast in place after that."""
    import torch

    from ..memory import release_memory

    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**_diffusers_unet_kwargs(unet_cfg)).eval(), 0)
    ref_cn = perturb(diffusers.ControlNetModel.from_unet(ref).eval(), 1)
    ref_ad = perturb(diffusers.T2IAdapter(in_channels=3, channels=list(unet_cfg.block_out_channels), num_res_blocks=2,
                                          downscale_factor=8).eval(), 2)
    h = w = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, unet_cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(args.batch, 77, unet_cfg.cross_attention_dim, generator=g)
    hint = torch.rand(args.batch, 3, 8 * h, 8 * w, generator=g)
    t = torch.tensor(500.0)
    with torch.no_grad():  # the fp32 truth
        down, mid = ref_cn(x, t, ctx, controlnet_cond=hint, return_dict=False)
        truth_cn = ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        feats = ref_ad(hint)
        truth_ad = ref(x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
    del down, mid, feats
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory(prefix="md-comfyui-control-") as tmp:
        comfy = "comfyui" in getattr(bench, "peers", ())
        if comfy:  # the fp32 weights as ComfyUI's files, before the precision rows cast diffusers' models
            files = comfyui_files(tmp, unet_cfg, (ref, ref_cn, ref_ad), (x, ctx, hint))
        for precision in sorted(bench.precisions, key=lambda p: p != "fp32"):
            rows += _precision_rows(preset, precision, unet_cfg, (ref, ref_cn, ref_ad), (x, ctx, hint, t),
                                    (truth_cn, truth_ad), args, bench)
            release_memory()  # (our models of this precision are gone with the call)
        if comfy:
            del ref, ref_cn, ref_ad
            release_memory()  # the worker needs what this process no longer holds
            rows += comfyui_rows(tmp, preset, unet_cfg, files, (truth_cn, truth_ad), args, bench)
    return rows


def comfyui_files(tmp, unet_cfg, theirs, inputs) -> dict:
    """The weights as the files a ComfyUI user loads (SD single file, LDM ControlNet, TencentARC T2I-Adapter), the
    hint as an IMAGE and the step's inputs, in `tmp`."""
    import os

    import torch
    from safetensors.torch import save_file

    from ..control.keys import full_adapter_keymap, ldm_controlnet_tensors
    from ..weights.single_file import save_single_file

    x, ctx, hint = inputs
    unet, cn, ad = _plain(unet_cfg, theirs)
    files = {"weights": os.path.join(tmp, "unet.safetensors"), "controlnet": os.path.join(tmp, "cn.safetensors"),
             "t2i": os.path.join(tmp, "t2i.safetensors"), "hint": os.path.join(tmp, "hint.safetensors")}
    save_single_file({"unet": unet}, files["weights"])
    save_file(ldm_controlnet_tensors(cn), files["controlnet"])
    save_file({k: v.contiguous() for k, v in full_adapter_keymap(ad.config).reverse(ad.state_dict()).items()},
              files["t2i"])
    save_file({"hint": hint.permute(0, 2, 3, 1).contiguous()}, files["hint"])
    save_file({"x": x, "t": torch.full((len(x),), 500.0), "context": ctx}, os.path.join(tmp, "inputs.safetensors"))
    return files


def comfyui_rows(tmp, preset, unet_cfg, files, truths, args, bench) -> list:
    """The ControlNet and T2I-Adapter steps in ComfyUI (worker process on ComfyUI's Python) against ours in that
    process; the error of ComfyUI's output against the fp32 truth."""
    import os

    import torch
    from safetensors.torch import load_file

    from .comfyui_peer import _work, python_for_comfyui

    spec = {"comfyui_dir": str(args.comfyui), "comfyui_args": args.comfyui_args, "weights": files["weights"],
            "inputs": os.path.join(tmp, "inputs.safetensors"), "outputs": os.path.join(tmp, "outputs.safetensors"),
            "config": _config_json(unet_cfg),
            "precisions": list(bench.precisions), "runs": args.runs, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "control": files}
    result = _work(spec, python_for_comfyui(args), tmp)
    if "error" in result:
        bench.print(f"control {preset} comfyui: failed, {result['error']}")
        return [{"preset": preset, "case": "comfyui", "note": f"ComfyUI failed: {result['error']}"}]
    outputs = load_file(spec["outputs"])
    rows = []
    for precision, r in result["precisions"].items():
        for kind, case, truth in (("controlnet", "controlnet step", truths[0]), ("t2i", "t2i-adapter step", truths[1])):
            k = r[kind]
            if "error" in k:
                rows.append({"preset": preset, "precision": precision, "case": f"{case} vs ComfyUI",
                             "note": f"ComfyUI cannot load it: {k['error']}"})
                bench.print(f"control {preset} {precision} {case}: ComfyUI cannot load it ({k['error']})")
                continue
            row = {"preset": preset, "precision": precision, "case": f"{case} vs ComfyUI", "ours_ms": round(k["ours_ms"], 1),
                   "comfyui_ms": round(k["ms"], 1), "ratio": round(k["ms"] / k["ours_ms"], 2),
                   "comfyui_rel_err": rel_err(outputs[f"{kind}_{precision}"], truth),
                   "note": f"ComfyUI {result['comfyui']} on torch {result['torch']} ({k['comfy_class']}, weights "
                           f"{r['weight_dtype']}, compute {r['compute_dtype']}, {result['attention']}); ours in its "
                           "process"}
            if kind == "t2i" and set(unet_cfg.layers_per_block) != {2}:
                row["note"] += ("; ComfyUI places T2I-Adapter features for SD's 2 blocks per level, so on this layout its "
                                "output is another computation (the error says how far)")
            rows.append(row)
            bench.print(f"control {preset} {precision} {case}: ours {row['ours_ms']} ms, ComfyUI {row['comfyui_ms']} ms "
                        f"({row['ratio']}x); ComfyUI's rel err vs diffusers fp32 {row['comfyui_rel_err']:.1e}")
    return rows


def _config_json(unet_cfg) -> str:
    """A ModelConfig JSON around this UNet (the worker loads the UNet file with it)."""
    import dataclasses

    from ..presets import get_preset

    return dataclasses.replace(get_preset("sd15"), unet=unet_cfg).to_json()


def plugin_rows(args, bench) -> list:
    """The default model's shipped control plugin: a one-step image (text encoder, UNet, decoder) with and without
    it, in torch on the fast path; the plugin's adapter runs once per image."""
    import torch

    from ..control.load import load_control, resolve_control
    from ..pipeline import load_pipeline
    from .measure import time_alternating

    pipe = load_pipeline()
    plugin = load_control(resolve_control("md-shapes-scribble"), base=pipe.unet)
    size = pipe.config.resolution
    hint = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    prompt = "a blue square on a white background"
    with torch.no_grad():
        ms = time_alternating({"plain": lambda: pipe(prompt, seed=0),
                               "plugin": lambda: pipe(prompt, seed=0, control=[(plugin, hint)])},
                              runs=max(args.runs, 20), warmup=args.warmup)
        adapter = time_alternating({"adapter": lambda: plugin.features(hint)}, runs=max(args.runs, 20),
                                   warmup=args.warmup)
    params = sum(p.numel() for p in plugin.parameters())
    row = {"preset": "mobilediffusion default", "precision": "fp32", "case": "plugin: one-step image",
           "plain_ms": round(ms["plain"], 2), "with_plugin_ms": round(ms["plugin"], 2),
           "extra": round(ms["plugin"] / ms["plain"] - 1, 3), "adapter_ms": round(adapter["adapter"], 2),
           "plugin_parameters": params}
    bench.print(f"control plugin (md-shapes-scribble, {params} parameters): one-step {size}x{size} image {row['plain_ms']} ms, "
                f"with the plugin {row['with_plugin_ms']} ms (+{100 * row['extra']:.1f}%; the adapter alone "
                f"{row['adapter_ms']} ms)")
    return [row]


def _ours(unet_cfg, theirs, dtype) -> list:
    """Our UNet, ControlNet and adapter holding diffusers' weights, on the fast path in `dtype`."""
    from .. import fast

    return [fast.optimize(m, dtype=dtype) for m in _plain(unet_cfg, theirs)]


def _plain(unet_cfg, theirs) -> list:
    """Our UNet, ControlNet and adapter holding diffusers' weights, plain modules in float32."""
    from ..control.load import control_from_state
    from ..unet import UNet
    from ..weights.keymap import load_state
    from ..weights.unet_keys import unet_keymap

    ref, ref_cn, ref_ad = theirs
    unet = UNet(unet_cfg).eval()
    load_state(unet, ref.state_dict(), unet_keymap(unet_cfg), what="UNet")
    cn = control_from_state({k: v.float() for k, v in ref_cn.state_dict().items()}, base=unet, name="ControlNet")
    ad = control_from_state({k: v.float() for k, v in ref_ad.state_dict().items()}, name="T2I-Adapter")
    return [unet, cn, ad]


def _precision_rows(preset, precision, unet_cfg, theirs, inputs, truths, args, bench) -> list:
    import torch

    from .. import fast
    from ..control.adapter import adapter_skips

    dtype = fast.PRECISIONS[precision]
    ours_unet, ours_cn, ours_ad = _ours(unet_cfg, theirs, dtype)
    d_unet, d_cn, d_ad = (m.to(dtype) for m in theirs)  # in place: fp32 runs first
    x, ctx, hint, t = inputs
    xs, cs, hs = x.to(dtype), ctx.to(dtype), hint.to(dtype)
    levels, skips = adapter_skips(ours_unet), ours_unet.skip_count
    out = {}

    def ours_controlnet():
        out["ours_cn"] = ours_unet(xs, t, cs, control=ours_cn(xs, t, cs, hs))

    def diffusers_controlnet():
        dn, md = d_cn(xs, t, cs, controlnet_cond=hs, return_dict=False)
        out["ref_cn"] = d_unet(xs, t, cs, down_block_additional_residuals=dn, mid_block_additional_residual=md).sample

    with torch.no_grad():
        res = ours_ad(hs, levels, skips)
        d_feats = d_ad(hs)

        def ours_adapter_step():
            out["ours_ad"] = ours_unet(xs, t, cs, control=res)

        def diffusers_adapter_step():
            out["ref_ad"] = d_unet(xs, t, cs, down_intrablock_additional_residuals=[f.clone() for f in d_feats]).sample

        cn_ms = time_alternating({"ours": ours_controlnet, "diffusers": diffusers_controlnet}, runs=args.runs,
                                 warmup=args.warmup)
        ad_ms = time_alternating({"ours": ours_adapter_step, "diffusers": diffusers_adapter_step}, runs=args.runs,
                                 warmup=args.warmup)
        once = time_alternating({"ours": lambda: ours_ad(hs, levels, skips), "diffusers": lambda: d_ad(hs)},
                                runs=args.runs, warmup=args.warmup)
        plain = time_alternating({"ours": lambda: ours_unet(xs, t, cs)}, runs=args.runs, warmup=args.warmup)
    rows = []
    for case, ms, ours_out, ref_out, truth in (
            ("controlnet step", cn_ms, out["ours_cn"], out["ref_cn"], truths[0]),
            ("t2i-adapter step", ad_ms, out["ours_ad"], out["ref_ad"], truths[1]),
            ("t2i-adapter (once per image)", once, None, None, None)):
        row = {"preset": preset, "precision": precision, "case": case, "ours_ms": round(ms["ours"], 1),
               "diffusers_ms": round(ms["diffusers"], 1), "ratio": round(ms["diffusers"] / ms["ours"], 2),
               "plain_unet_ms": round(plain["ours"], 1)}
        if truth is not None:
            row["ours_rel_err"] = rel_err(ours_out.float(), truth)
            row["diffusers_rel_err"] = rel_err(ref_out.float(), truth)
        rows.append(row)
        err = "" if truth is None else (f", rel err vs diffusers fp32 {row['ours_rel_err']:.1e} "
                                        f"(diffusers {precision}: {row['diffusers_rel_err']:.1e})")
        bench.print(f"control {preset} {precision} {case}: ours {row['ours_ms']} ms, diffusers "
                    f"{row['diffusers_ms']} ms ({row['ratio']}x){err}; our plain UNet step {row['plain_unet_ms']} ms")
    return rows
