"""`mobilediffusion bench` (also `python -m mobilediffusion.bench`): how fast the text encoder, a UNet step
and the decoder run, ours against the reference and the peers a user could pick, and end to end.

The sections live in mobilediffusion/benchmarks/ (see its __init__ for how one plugs in); this module
keeps the entry points and the names other code and the tests use.
"""
from __future__ import annotations

import sys

from .benchmarks.cli import add_parser, cmd_bench, run
from .benchmarks.end_to_end import CASES as E2E, end_to_end, end_to_end_subprocess
from .benchmarks.measure import count_gflop, measure_int8_peak, measure_peak, median_ms, psnr, rel_err, time_alternating
from .benchmarks.rows import PeerRow, Row, format_peer, format_row
from .cli import main as cli_main

__all__ = ["add_parser", "cmd_bench", "run", "main", "measure_peak", "measure_int8_peak", "count_gflop", "time_alternating", "median_ms",
           "rel_err", "psnr", "end_to_end", "end_to_end_subprocess", "E2E", "Row", "PeerRow", "format_row",
           "format_peer"]


def main(argv=None) -> int:
    """`python -m mobilediffusion.bench [flags]`: the same as `mobilediffusion bench [flags]`."""
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
