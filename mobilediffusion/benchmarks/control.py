"""Section `control` (`bench --control`): one UNet step with a ControlNet, and one with a T2I-Adapter's residuals
(the adapter itself runs once per image and is timed apart), ours against diffusers' ControlNetModel /
T2IAdapter + UNet2DConditionModel on the same random weights, per SD-family preset and precision.

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
    rows = []
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
    for precision in sorted(bench.precisions, key=lambda p: p != "fp32"):
        rows += _precision_rows(preset, precision, unet_cfg, (ref, ref_cn, ref_ad), (x, ctx, hint, t),
                                (truth_cn, truth_ad), args, bench)
        release_memory()  # (our models of this precision are gone with the call)
    return rows


def _ours(unet_cfg, theirs, dtype) -> list:
    """Our UNet, ControlNet and adapter holding diffusers' weights, on the fast path in `dtype`."""
    from .. import fast
    from ..control.load import control_from_state
    from ..unet import UNet
    from ..weights.keymap import load_state
    from ..weights.unet_keys import unet_keymap

    ref, ref_cn, ref_ad = theirs
    unet = UNet(unet_cfg).eval()
    load_state(unet, ref.state_dict(), unet_keymap(unet_cfg), what="UNet")
    cn = control_from_state(ref_cn.state_dict(), base=unet, name="ControlNet")
    ad = control_from_state(ref_ad.state_dict(), name="T2I-Adapter")
    return [fast.optimize(m, dtype=dtype) for m in (unet, cn, ad)]


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
