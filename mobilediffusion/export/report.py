"""A bundle's manifest as text: shapes and sampler, per component the file, precision, error against the
torch model in fp32 and the GPU-delegate verdict, and the end-to-end PSNR. Pure Python (no torch): the
export summary, the export node and `mobilediffusion info BUNDLE` print it."""
from __future__ import annotations

from .flatbuffer import FLATBUFFER_LIMIT
from .gpu import summary_line


def headline(m: dict) -> str:
    """'(512x512 + 512x768, batch 1, dpmpp_2m 20 steps, guidance 7.5, prompts up to 225 tokens)'."""
    img, s = m["image"], m["sampler"]
    guidance = f", guidance {s['guidance']:g}" if s["guidance"] else ""
    sizes = " + ".join(f"{w}x{h}" for h, w in img.get("sizes") or [[img["height"], img["width"]]])
    tokens = (m["tokenizer"]["max_length"] - 2) * m["tokenizer"].get("max_chunks", 1)
    return (f"({sizes}, batch {img['batch_size']}, {s['name']} {s['steps']} step{'s' * (s['steps'] != 1)}{guidance}, "
            f"prompts up to {tokens} tokens)")


def component_lines(m: dict) -> list[str]:
    """Two lines per component (file, size, precision, error; GPU delegate) and the end-to-end PSNR."""
    lines = []
    v = m.get("verification", {})
    for name, e in m["components"].items():
        check = v.get(name)
        if check is None:
            err = "not verified"
        else:
            limit = f"limit {check['limit']:.0e}" if check["limit"] else f"no limit for {e['precision']}: reported"
            err = f"rel. error vs fp32 torch {check['rel_error']:.2e} ({limit})"
        large = ", large-model form" if e["bytes"] >= FLATBUFFER_LIMIT else ""
        signatures = len(e.get("signatures") or [e])
        sigs = f", {signatures} signatures" if signatures > 1 else ""
        lines.append(f"  {e['file']}: {e['bytes'] / 2**20:.2f} MiB, {e['precision']}{large}{sigs}, {err}")
        used = (m.get("memory") or {}).get("components", {}).get(name)
        if used and used.get("resident_bytes") is not None:
            lines.append(f"    in the interpreter: {used['resident_bytes'] / 2**20:.1f} MiB resident (weights "
                         f"{used['weights_bytes'] / 2**20:.1f} + arena {used['arena_bytes'] / 2**20:.1f})")
        lines.append(f"    {summary_line(e.get('gpu'))}")
    memory = m.get("memory")
    if memory and memory.get("generation_peak_bytes") is not None:
        h, w = memory["size"]
        budget = f" (budget {memory['budget_bytes'] / 2**30:.2f} GiB)" if memory.get("budget_bytes") else ""
        lines.append(f"  one generation at {w}x{h}: {memory['generation_peak_bytes'] / 2**20:.1f} MiB peak over the "
                     f"process's own{budget}")
    c = m.get("control")
    if c:
        hint = c["hint"]
        src = c.get("source") or {}
        origin = src.get("name") or src.get("file") or "a model given in Python"
        lines.append(f"  control: {c['component']} ({c['kind']}, runs {c['runs']}) from {origin}, hint "
                     f"{hint['channels']}x{hint['height']}x{hint['width']}, {len(c['residuals'])} UNet inputs")
    if "inpainting" in m:
        p = m["inpainting"]
        lines.append("  inpainting: the encoder repaints a masked image" + (
            f" (an inpainting UNet: {p['concat_channels']} concat channels)" if p.get("concat_channels") else
            " (the known region kept at every step)"))
    e2e = v.get("end_to_end")
    if e2e:
        first = f"first {e2e['steps']} of {e2e['of_steps']} steps" if "steps" in e2e else "all steps"
        lines.append(f"  end to end vs torch ({first}): PSNR {e2e['psnr_db']:.1f} dB")
    elif {"text_encoder", "unet", "decoder"} <= set(m["components"]):
        lines.append("  end to end vs torch: not checked")
    return lines


def describe(path, m: dict) -> str:
    """`mobilediffusion info BUNDLE`: the bundle, the model it holds and where its weights came from."""
    model = m["model"]
    lines = [f"bundle:           {path}", f"schema version:   {m['schema_version']} ({m.get('created_by', '?')})",
             f"family:           {model['family']} ({model['prediction_type']}, {model['latent_channels']}-channel "
             f"latents)", f"fixed:            {headline(m)}"]
    source = m.get("source")
    if source:
        lines.append(f"source:           {source.get('checkpoint', '?')}")
        for lora in source.get("loras", []):
            lines.append(f"  lora {lora['file']} ({lora['component']}, strength {lora['strength']:g}, "
                         f"sha256 {lora['sha256'][:12]}...)")
    lines.append("components:")
    return "\n".join(lines + component_lines(m))
