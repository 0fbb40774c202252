"""Spatial control of the UNet: residuals (ComfyUI's input / middle / output), ControlNets and T2I-Adapters."""
from .residuals import Residuals

__all__ = ["Residuals"]
