"""Parts of `mobilediffusion bench` that measure one thing each, as functions returning rows (dicts):
`decoders` (the 512 x 512 decoders, mode by mode, stage by stage) and `loading` (ready-to-sample times of
checkpoints against diffusers and ComfyUI)."""
