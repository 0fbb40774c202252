"""Export TFLite Bundle (output node) and Run TFLite Bundle: a device bundle from the loaded model, and
what the device will make of it."""
from __future__ import annotations

import importlib.util
import logging
import os

from ._common import CATEGORY, ModelCache, Progress, file_key
from ..mobilediffusion.prompts import DEFAULT_CHUNKS
from .bundles import bundle_choices, bundle_root, check_name, pack_choices, resolve_bundle, resolve_pack
from .lora import resolve_lora

log = logging.getLogger("mobilediffusion.nodes")

def component_choices() -> list[str]:
    """"all" and each component the exporter knows (its table, mobilediffusion/export/components.py)."""
    from ..mobilediffusion.runtime.manifest import COMPONENTS

    return ["all", *COMPONENTS]


BUNDLES = ModelCache(size=1)  # the last bundle run, apart from the model cache (it must not evict models)


def litert_missing() -> str | None:
    """The install message when the export extra is missing, else None."""
    from ..mobilediffusion.ops.backend import EXPORT_INSTALL

    if importlib.util.find_spec("litert_torch") is None or importlib.util.find_spec("ai_edge_litert") is None:
        return f"TFLite export needs litert-torch (no TensorFlow needed). Install it into ComfyUI's Python with: " \
               f"{EXPORT_INSTALL}   then restart ComfyUI."
    return None


class ExportTFLiteBundle:
    @classmethod
    def INPUT_TYPES(cls):
        from ..mobilediffusion.runtime.manifest import PRECISIONS
        from ..mobilediffusion.runtime.sampler import SAMPLERS

        return {
            "required": {
                "unet": ("MD_UNET", {"tooltip": "The UNet from Load MobileDiffusion Model."}),
                "clip": ("MD_CLIP", {"tooltip": "The text encoder from Load MobileDiffusion Model."}),
                "decoder": ("MD_DECODER", {"tooltip": "The decoder from Load MobileDiffusion Model (or Load Lite "
                                                     "Decoder)."}),
                "name": ("STRING", {"default": "mobilediffusion-bundle", "tooltip": "Bundle folder name, written "
                                    "to output/mobilediffusion/<name>. Letters, digits, - _ . only."}),
                "precision": (list(PRECISIONS), {"default": "fp16", "tooltip": "Weights: fp32 (exact), fp16 (half "
                              "size), int8_dynamic (quarter size, integer compute), int8_weight_only (quarter size), "
                              "int8_a16 (int8 weights + int16 activations, calibrated: for phone NPUs)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip": "Image width fixed in "
                                  "the bundle; 0 uses the model's resolution."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip": "Image height fixed "
                                   "in the bundle; 0 uses the model's resolution."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Sampling steps baked into the "
                                  "bundle; 0 uses the model's default (1 for one-step models)."}),
                "sampler_name": (["auto", *SAMPLERS], {"default": "auto", "tooltip": "Sampler baked into the bundle; "
                                 "auto uses the model's default."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance; 0 uses the model's default, <= 1 is off. "
                                             "Guidance doubles the UNet's batch on the device."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Images per run, fixed in the "
                                       "bundle."}),
                "components": (component_choices(), {"default": "all", "tooltip": "Export every stage (needed to run "
                               "the bundle) or one of them."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing bundle of this name."}),
                "make_zip": ("BOOLEAN", {"default": False, "tooltip": "Also write <name>.zip next to the folder."}),
            },
            "optional": {
                "web": ("BOOLEAN", {"default": False, "tooltip": "Also write a web player (LiteRT.js, runs the bundle "
                        "in a browser) into <name>/web; open it with `mobilediffusion serve-bundle <folder>`. Needs "
                        "Node.js and npm once, to install its packages. Not for int8_a16 (LiteRT.js has no int16 "
                        "tensors): use fp16 or int8_dynamic."}),
                "end_to_end_check": ("BOOLEAN", {"default": True, "tooltip": "After checking each file, run the first "
                                     "sampling steps of the bundle against PyTorch (off: faster, components only)."}),
                "extra_sizes": ("STRING", {"default": "", "tooltip": "More image sizes in the same bundle, WIDTHxHEIGHT "
                                "separated by commas (e.g. 512x768, 768x512): one UNet and decoder signature each over "
                                "shared weights; width x height above stays the default."}),
                "prompt_chunks": ("INT", {"default": DEFAULT_CHUNKS, "min": 1, "max": 8, "tooltip": "Longest prompt the "
                                  "bundle takes, in chunks of 75 tokens (one UNet signature per context length)."}),
                "budget": ("STRING", {"default": "", "tooltip": "Memory one generation may take on the device, e.g. "
                           "2GB (empty: no limit). Refused before converting when the precision cannot fit, naming "
                           "one that does; the measured figure is checked too."}),
                "loras_as_packs": ("BOOLEAN", {"default": False, "tooltip": "Export the model without the LoRAs applied "
                                   "upstream (LoraLoader, MobileDiffusion LoRA) and write each as a LoRA pack into "
                                   "<name>/loras: the web player and Run TFLite Bundle then switch it and its strength "
                                   "at run time. Off: the LoRAs are baked into the weights."}),
                "control": ("MD_CONTROL", {"tooltip": "A control model (Load MobileDiffusion Control) to write as the "
                            "bundle's control component: the runtime and the web player then take a control image "
                            "(T2I-Adapters run once, ControlNets every step)."}),
                "encoder": ("MD_ENCODER", {"tooltip": "The image encoder (Load MobileDiffusion Model's encoder output): "
                            "the bundle then repaints the masked part of an image (inpainting). Needed for 9-channel "
                            "inpainting models."}),
            },
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "export"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Converts the model to TFLite (text encoder, UNet, decoder), verifies each file in the LiteRT "
                   "interpreter against PyTorch and writes a device bundle under output/mobilediffusion.")

    def export(self, unet, clip, decoder, name, precision, width, height, steps, sampler_name, cfg, batch_size,
               components, overwrite, make_zip, web=False, end_to_end_check=True, extra_sizes="",
               prompt_chunks=DEFAULT_CHUNKS, budget="", loras_as_packs=False, control=None, encoder=None):
        from ..mobilediffusion.errors import ConfigError
        from ..mobilediffusion.pipeline import Pipeline

        # 1. request checks before any work
        name = check_name(name)
        message = litert_missing()
        if message:
            log.warning(message)
            return {"ui": {"text": [message]}, "result": ()}
        config = unet.config
        sizes = None
        if extra_sizes.strip():
            from ..mobilediffusion.cli_common import parse_sizes

            sizes = [(height or config.resolution, width or config.resolution),
                     *parse_sizes(extra_sizes, what="extra_sizes")]
        if decoder.decoder.config.latent_channels != config.latent_channels:
            raise ConfigError(f"the decoder reads {decoder.decoder.config.latent_channels}-channel latents but the "
                              f"UNet makes {config.latent_channels}; connect the decoder of the same model")
        if web:
            if components != "all":
                raise ConfigError("the web player runs the whole bundle; export components 'all' or turn web off")
            from ..mobilediffusion.web import check_web_precision, prepare_player

            check_web_precision(precision)
            prepare_player()  # npm packages of the player, before the export work
        out_dir = os.path.join(bundle_root(), name)
        image_encoder = None
        if encoder is not None:
            image_encoder = encoder.require()
            if (encoder.latent_scale, encoder.latent_shift) != (config.latent_scale, config.latent_shift):
                raise ConfigError(f"the encoder writes another latent space than the UNet samples in; connect the "
                                  f"encoder of the same model ({unet.name})")
        elif getattr(unet.unet, "concat_channels", 0):
            raise ConfigError("this is an inpainting UNet (9 input channels): connect its encoder (Load MobileDiffusion "
                              "Model's encoder output) so the bundle can encode the masked image")
        if control is not None and components != "all":
            raise ConfigError("a bundle with a control model is a whole bundle: export components 'all'")
        # 2. the model as one pipeline; a separately loaded decoder may read another latent space
        pipe = Pipeline(config, unet.unet, clip, decoder.decoder, encoder=image_encoder)
        space = None
        if (decoder.latent_scale, decoder.latent_shift) != (config.latent_scale, config.latent_shift):
            a = decoder.latent_scale / config.latent_scale
            space = (a, (config.latent_shift - decoder.latent_shift) * decoder.latent_scale)
        from ..mobilediffusion.export.bundle import export_bundle, summary
        from ..mobilediffusion.export.endtoend import DEFAULT_STEPS
        from ..mobilediffusion.export.provenance import pipeline_source

        source = pipeline_source(pipe, checkpoint=unet.name)
        packs = []
        if loras_as_packs:  # the model without its LoRAs; each LoRA a pack beside it
            from ..mobilediffusion.export.lora_pack import split_loras

            pipe, packs = split_loras(pipe, resolve=resolve_lora)
            if source and "loras" in source:
                source["loras_as_packs"] = source.pop("loras")
        bar = Progress(1)
        path = export_bundle(
            pipe, out_dir, precision, height=None if sizes else height or None, width=None if sizes else width or None,
            sizes=sizes, prompt_chunks=prompt_chunks, budget=budget.strip() or None, batch_size=batch_size,
            steps=steps or None, sampler=sampler_name, guidance=cfg or None, overwrite=overwrite, make_zip=make_zip,
            components=("text_encoder", "unet", "decoder") if components == "all" else (components,),
            decoder_latent_space=space, progress=lambda done, total, msg: bar(done, total, None),
            end_to_end_steps=DEFAULT_STEPS if end_to_end_check else 0,
            source=source, control=None if control is None else control.model, encoder=image_encoder is not None,
            control_source=None if control is None else _control_source(control),
        )
        text = summary(path)
        if packs:
            from ..mobilediffusion.export.lora_pack import export_lora_pack

            for lora, strength in packs:
                pack = export_lora_pack(lora, path, strength=strength, overwrite=True)
                text += f"\n  LoRA pack: {pack} ({pack.stat().st_size / 2**20:.2f} MiB, strength {strength:g})"
        if web:
            from ..mobilediffusion.web import write_player

            text += f"\n  web player: {write_player(path)} (open it with: mobilediffusion serve-bundle {path})"
        log.info(text)
        return {"ui": {"text": text.splitlines()}, "result": ()}


def _control_source(control) -> dict:
    from ..mobilediffusion.export.cli import control_file_source

    return {"name": control.name, **control_file_source(control.path)}


class RunTFLiteBundle:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "bundle": (bundle_choices(), {"tooltip": "A bundle from output/mobilediffusion (written by Export "
                           "TFLite Bundle) or models/mobilediffusion (folders and .zip files); refresh after "
                           "exporting."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to draw."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Used when the "
                                    "bundle was exported with guidance > 1."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed, drawn "
                                 "with numpy as the device runtime draws it."}),
            },
            "optional": {
                "size": ("STRING", {"default": "", "tooltip": "WIDTHxHEIGHT: one of the bundle's sizes (empty: its "
                         "default)."}),
                "lora": (["none", *pack_choices()], {"default": "none", "tooltip": "A LoRA pack made for this bundle "
                         "(<bundle>/loras, written by `mobilediffusion export-lora`), patched in at load: changing its "
                         "strength re-patches, nothing is exported again."}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                            "tooltip": "Strength of the LoRA pack (0: the bundle as exported)."}),
                "control_image": ("IMAGE", {"tooltip": "The control image of a bundle exported with a control model "
                                  "(edges, scribble, ...)."}),
                "control_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                               "tooltip": "How strongly the control image steers (0: off)."}),
                "image": ("IMAGE", {"tooltip": "An image to repaint (bundles exported with an encoder); give the mask "
                          "too."}),
                "mask": ("MASK", {"tooltip": "What to repaint (1 / white); Load Image's mask is its transparent part."}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("What the device makes: the bundle run by the TFLite interpreter, without PyTorch.",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "Runs an exported TFLite bundle the way the phone app will (numpy + the LiteRT interpreter)."

    def run(self, bundle, prompt, negative_prompt, seed, size="", lora="none", lora_strength=1.0, control_image=None,
            control_strength=1.0, image=None, mask=None):
        import torch

        from ..mobilediffusion.cli_common import parse_size
        from ..mobilediffusion.runtime import BundlePipeline
        from ..mobilediffusion.runtime.manifest import MANIFEST

        path = resolve_bundle(bundle)
        width, height = parse_size(size, what="size") if size.strip() else (None, None)
        packs = [(resolve_pack(bundle, lora), lora_strength)] if lora != "none" else []
        stamp = file_key(os.path.join(path, MANIFEST) if os.path.isdir(path) else path)
        pipe = BUNDLES.get(stamp, lambda: BundlePipeline(path))
        if [(str(p.path), s) for p, s in pipe.loras] != [(str(p), s) for p, s in packs]:
            pipe.set_loras(packs)  # the cached bundle re-patched: a strength change costs no export
        steps = pipe.manifest["sampler"]["steps"]
        bar = Progress(steps)
        first = lambda t: None if t is None else t[0].float().cpu().numpy()  # noqa: E731  IMAGE/MASK -> one array
        images = pipe(prompt, negative_prompt, seed=seed, callback=bar, height=height, width=width,  # (B, H, W, 3)
                      control_image=first(control_image), control_strength=control_strength, image=first(image),
                      mask=None if mask is None else first(mask if mask.dim() == 3 else mask[None]))
        return (torch.from_numpy(images.copy()).float(),)
