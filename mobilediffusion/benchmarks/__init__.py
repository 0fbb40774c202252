"""`mobilediffusion bench`, as sections: each module named in SECTIONS measures one thing.

A section module has
    add_arguments(parser)   its command-line flags (added to `bench`)
    check(args)             raise ConfigError for a bad request (runs before any heavy work)
    enabled(args) -> bool   whether this request runs it
    run(args, bench) -> dict   its JSON part (merged into the result); text lines via bench.print(...)
where `bench` (cli.Bench) gives the checked presets and precisions, bench.peak(precision) (the
machine's measured GFLOP/s, measured once), bench.peers (the peers that can run here), bench.args.
To add a section: write the module and add its name to SECTIONS.
"""

SECTIONS = (  # modules of this package, run in this order
    "components",  # text encoder, UNet step, decoder: ours in each mode vs the reference and the peers
    "end_to_end",  # --end-to-end: one 512x512 image per case in a fresh process, with each component's share
    "decoders",  # --decoders: the 512x512 decoders mode by mode and stage by stage
    "loading",  # --load: ready-to-sample times of checkpoints against diffusers and ComfyUI
    "control",  # --control: a UNet step with a ControlNet / T2I-Adapter against diffusers
)
