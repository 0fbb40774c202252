"""ComfyUI entry point of ComfyUI-MobileDiffusion: the node registry (and nothing else)."""
from .nodes._common import register_model_folder
from .nodes.decode import MobileDiffusionLiteDecode
from .nodes.decoder_loader import LoadLiteDecoder
from .nodes.loader import LoadMobileDiffusionModel
from .nodes.sampler import MobileDiffusionSampler
from .nodes.text_encode import MobileDiffusionTextEncode

register_model_folder()

NODE_CLASS_MAPPINGS = {
    "LoadMobileDiffusionModel": LoadMobileDiffusionModel,
    "LoadLiteDecoder": LoadLiteDecoder,
    "MobileDiffusionTextEncode": MobileDiffusionTextEncode,
    "MobileDiffusionSampler": MobileDiffusionSampler,
    "MobileDiffusionLiteDecode": MobileDiffusionLiteDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadMobileDiffusionModel": "Load MobileDiffusion Model",
    "LoadLiteDecoder": "Load Lite Decoder",
    "MobileDiffusionTextEncode": "Text Encode (MobileDiffusion)",
    "MobileDiffusionSampler": "MobileDiffusion Sampler",
    "MobileDiffusionLiteDecode": "Lite Decode",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
