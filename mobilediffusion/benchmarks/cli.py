"""The `bench` command: common flags, the request check, the machine's peak, then each section in turn."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform

from ..errors import ConfigError
from ..presets import PRESETS, get_preset
from . import SECTIONS, peers
from .measure import peak_rss_mb

DEFAULT_PRECISIONS = ("fp32,bf16",)  # without --precision; those this machine lacks are left out with one line


def asked_precisions(args) -> tuple[list[str], dict[str, str]]:
    """(--precision's names in order, {}), or without it (DEFAULT_PRECISIONS less those this machine lacks, {name:
    why it lacks it}) for one line each. Asked names are not checked here (check_precision refuses them)."""
    from .. import fast

    names = list(dict.fromkeys(p for spec in args.precision or DEFAULT_PRECISIONS for p in spec.split(",") if p))
    if args.precision:
        return names, {}
    skipped = {p: why for p in names if (why := fast.unsupported_precision(p))}
    return [p for p in names if p not in skipped], skipped


def sections() -> list:
    return [importlib.import_module(f"{__package__}.{name}") for name in SECTIONS]


class Bench:
    """What the sections share in one run: the checked request, the machine's peaks, the peers, the output."""

    def __init__(self, args, presets: list[str], precisions: list[str]):
        self.args, self.presets, self.precisions = args, presets, precisions
        self.peers, self.skipped, self.peer_info = [], {}, {}
        self._peaks = {}

    def peak(self, precision: str) -> dict:
        """measure_peak for the precision, measured on first use."""
        if precision not in self._peaks:
            from .. import fast
            from .measure import measure_int8_peak, measure_peak

            runs = max(1, min(5, self.args.runs))  # a quick request (--runs 1) probes quickly too
            self._peaks[precision] = (measure_int8_peak(runs=runs) if precision == fast.INT8
                                      else measure_peak(fast.PRECISIONS[precision], runs=runs))
        return self._peaks[precision]

    @property
    def reference(self) -> bool:
        return "diffusers" in self.peers

    def print(self, line: str) -> None:
        if not self.args.json:
            print(line, flush=True)


def check(args) -> Bench:
    """The request, checked before any heavy work; ConfigError says what to change."""
    from .. import fast

    presets = [p for spec in args.preset for p in spec.split(",") if p]
    for p in presets:
        get_preset(p)  # unknown names: ConfigError listing the known ones
    precisions, skipped = asked_precisions(args)
    if fast.INT8 in precisions:  # --precision int8 is the int8 mode: rows beside bf16's, whose eager row they chain to
        precisions.remove(fast.INT8)
        args.int8 = True
        precisions += [] if "bf16" in precisions or fast.unsupported_precision("bf16") else ["bf16"]
    for p in precisions:
        fast.check_precision(p)  # unknown or unavailable: ConfigError saying which and why
    if args.size % 8:
        raise ConfigError(f"--size is in image pixels and must be a multiple of 8, got {args.size}")
    for p in presets:
        m = get_preset(p).unet.size_multiple
        if (args.size // 8) % m:
            raise ConfigError(f"preset {p}: --size must be a multiple of {8 * m} pixels, got {args.size}")
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs}, {args.warmup}")
    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        raise ConfigError(f"--save {args.save}: its folder does not exist; create it first")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    for section in sections():
        section.check(args)
    bench = Bench(args, presets, precisions)
    bench.precisions_skipped = skipped
    return bench


def run(args) -> dict:
    """Everything `mobilediffusion bench` measures, as a dict (what --json prints)."""
    import torch

    bench = check(args)
    # 1. the machine and the peers
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for p, why in bench.precisions_skipped.items():
        bench.print(f"{p} rows skipped: {why}")
    bench.peers, bench.skipped, bench.peer_info = peers.available(args)
    for name, why in bench.skipped.items():
        bench.print(f"peer {name} skipped: {why}")
    from .components import int8_skipped

    int8_why = int8_skipped(args)
    if int8_why:  # one line, and the rest runs (as the int8 precision runs bf16 on such a machine)
        bench.print(f"int8 rows skipped: {int8_why}; the int8 precision runs bf16 here")
        args.int8 = False
    peak_names = bench.precisions + (["int8"] if getattr(args, "int8", False) else [])
    for p in peak_names:
        bench.peak(p)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "peak": {p: bench.peak(p) for p in peak_names}},
        "settings": {"size": args.size, "latent": args.size // 8, "batch": args.batch, "runs": args.runs,
                     "warmup": args.warmup},
        "peers": [], "peers_info": bench.peer_info, "peers_skipped": bench.skipped, "rows": [], "end_to_end": [],
    }
    if int8_why:
        result["int8_skipped"] = int8_why
    if bench.precisions_skipped:
        result["precisions_skipped"] = bench.precisions_skipped
    # 2. the sections
    for section in sections():
        if section.enabled(args):
            result.update(section.run(args, bench))
    result["machine"]["bench_peak_rss_mb"] = peak_rss_mb()
    return result


def cmd_bench(args) -> int:
    result = run(args)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        peaks = ", ".join(f"{p} {v['gflops']:.0f} {'GOP' if p == 'int8' else 'GFLOP'}/s ({v['probe']})"
                          for p, v in result["machine"]["peak"].items())
        print(f"peak on {result['machine']['threads']} threads: {peaks}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` command to the CLI's subparsers."""
    b = subparsers.add_parser(
        "bench", help="time text encoder, UNet step and decoder against diffusers and the peers",
        description="Times each component of the given presets on random weights, ours against the reference "
                    "(diffusers / transformers) and the peers (ComfyUI, OpenVINO) on the same weights; median of "
                    "--runs after --warmup, alternating runs.")
    b.add_argument("--preset", action="append", default=None,
                   help=f"preset(s), comma-separated or repeated (default: sd15,sdxs-512); one of {', '.join(PRESETS)}")
    b.add_argument("--precision", action="append", default=None,
                   help="fp32, bf16, fp16 or int8, comma-separated or repeated (default: fp32,bf16, those of them this "
                        "CPU runs); int8 is --int8 (its rows come beside bf16's, which it adds)")
    b.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    for section in sections():
        section.add_arguments(b)
    b.add_argument("--attention", nargs="?", const="kernels", choices=("kernels", "candidates"),
                   help="instead: the attention kernel table (cpu kernel vs torch SDPA on the UNets' shapes); "
                        "'candidates' adds the compiled and blocked routes measured before choosing it")
    b.add_argument("--bundle", action="append", help="instead: time an exported bundle's .tflite files (XNNPACK) "
                   "against torch and one image through the numpy runtime (repeatable; see benchmarks/bundle.py)")
    b.add_argument("--checkpoint", help="with --bundle: the torch side's weights (default: random, same architecture)")
    b.set_defaults(func=_cmd_with_defaults)
    return b


def _cmd_with_defaults(args) -> int:
    if args.bundle:
        from .bundle import cmd_bundle_bench

        return cmd_bundle_bench(args)
    if args.attention:  # the attention kernel table instead of the components
        from .attention import main as attention_table

        return attention_table(args)
    args.preset = args.preset or ["sd15,sdxs-512"]
    return cmd_bench(args)

