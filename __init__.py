"""ComfyUI entry point of ComfyUI-MobileDiffusion: the node registry (and nothing else).

ComfyUI imports this folder as a package. Tools that run this file on its own, outside a
package (pytest sets up a repository root that holds an __init__.py this way), get an empty
registry instead of an import error.
"""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if __package__:
    from .nodes._common import register_model_folder
    from .nodes.bridge import MobileDiffusionFromComfy
    from .nodes.control_nodes import LoadMobileDiffusionControl, MobileDiffusionApplyControl
    from .nodes.decode import MobileDiffusionLiteDecode
    from .nodes.decoder_loader import LoadLiteDecoder
    from .nodes.encode import MobileDiffusionLiteEncode
    from .nodes.encoder_loader import LoadLiteEncoder
    from .nodes.export import ExportTFLiteBundle, RunTFLiteBundle
    from .nodes.loader import LoadMobileDiffusionModel
    from .nodes.lora import MobileDiffusionLoRA
    from .nodes.sampler import MobileDiffusionSampler
    from .nodes.text_encode import MobileDiffusionTextEncode
    from .nodes.train import TrainMobileDiffusionLoRA

    register_model_folder()

    NODE_CLASS_MAPPINGS = {
        "LoadMobileDiffusionModel": LoadMobileDiffusionModel,
        "LoadLiteDecoder": LoadLiteDecoder,
        "MobileDiffusionLoRA": MobileDiffusionLoRA,
        "LoadLiteEncoder": LoadLiteEncoder,
        "MobileDiffusionTextEncode": MobileDiffusionTextEncode,
        "MobileDiffusionSampler": MobileDiffusionSampler,
        "MobileDiffusionLiteDecode": MobileDiffusionLiteDecode,
        "MobileDiffusionLiteEncode": MobileDiffusionLiteEncode,
        "ExportTFLiteBundle": ExportTFLiteBundle,
        "RunTFLiteBundle": RunTFLiteBundle,
        "MobileDiffusionFromComfy": MobileDiffusionFromComfy,
        "LoadMobileDiffusionControl": LoadMobileDiffusionControl,
        "MobileDiffusionApplyControl": MobileDiffusionApplyControl,
        "TrainMobileDiffusionLoRA": TrainMobileDiffusionLoRA,
    }
    NODE_DISPLAY_NAME_MAPPINGS = {
        "LoadMobileDiffusionModel": "Load MobileDiffusion Model",
        "LoadLiteDecoder": "Load Lite Decoder",
        "MobileDiffusionLoRA": "MobileDiffusion LoRA",
        "LoadLiteEncoder": "Load Lite Encoder",
        "MobileDiffusionTextEncode": "Text Encode (MobileDiffusion)",
        "MobileDiffusionSampler": "MobileDiffusion Sampler",
        "MobileDiffusionLiteDecode": "Lite Decode",
        "MobileDiffusionLiteEncode": "Lite Encode",
        "ExportTFLiteBundle": "Export TFLite Bundle",
        "RunTFLiteBundle": "Run TFLite Bundle",
        "MobileDiffusionFromComfy": "From ComfyUI Model",
        "LoadMobileDiffusionControl": "Load MobileDiffusion Control",
        "MobileDiffusionApplyControl": "Apply MobileDiffusion Control",
        "TrainMobileDiffusionLoRA": "Train MobileDiffusion LoRA",
    }

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
