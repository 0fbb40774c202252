"""Spatial control of the UNet: residuals (ComfyUI's input / middle / output), ControlNets and T2I-Adapters
(load_control), inpainting inputs, and model-free condition images (preprocess: numpy only, so the torch-free
runtime can use it; this package imports torch only when a torch part is asked for)."""


def __getattr__(name):
    if name == "Residuals":
        from .residuals import Residuals

        return Residuals
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Residuals"]
