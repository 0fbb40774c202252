"""Prompt-following benchmark of a trained model on held-out captions (a benchmark, not a timed test).

    report = evaluate_pipeline(pipe, SceneConfig(), sampler="onestep", steps=1)
    print(quality_table({"pre-trained 20 steps": ..., "DiffusionGAN 1 step": ...}))

Captions come from the held-out split of the synthetic scenes (colour, shape, position
combinations never seen in training); images are read back by the model-free evaluator
(mobilediffusion.train.evaluate), which also gives the Frechet scene distance (FSD).
"""
from __future__ import annotations

import numpy as np

from .data import SceneConfig, SyntheticScenes
from .evaluate import Report, evaluate


def heldout_prompts(cfg: SceneConfig, n: int) -> tuple[list[str], list]:
    """n (caption, scene) pairs of the held-out split (each combination equally often)."""
    scenes = SyntheticScenes(cfg, "heldout", length=n)
    items = [scenes[i] for i in range(n)]
    return [it.caption for it in items], [it.scene for it in items]


def generate(pipe, prompts: list[str], *, sampler: str, steps: int, guidance: float = 0.0, seed: int = 0,
             batch: int = 32) -> np.ndarray:
    """Images uint8 (N, H, W, 3) at the model's resolution; batch k uses seed + k."""
    size = pipe.config.resolution
    out = []
    for k, i in enumerate(range(0, len(prompts), batch)):
        images = pipe(prompts[i:i + batch], steps=steps, guidance=guidance, seed=seed + k, height=size, width=size,
                      sampler=sampler)
        out += [np.asarray(im) for im in images]
    return np.stack(out)


def evaluate_pipeline(pipe, cfg: SceneConfig, *, n: int = 128, sampler: str = "onestep", steps: int = 1,
                      guidance: float = 0.0, seed: int = 0) -> Report:
    """Evaluator report of `pipe` on n held-out captions."""
    prompts, scenes = heldout_prompts(cfg, n)
    return evaluate(generate(pipe, prompts, sampler=sampler, steps=steps, guidance=guidance, seed=seed), scenes, cfg)


def quality_table(reports: dict[str, Report]) -> str:
    """Markdown table: one row per model/sampler, accuracy per attribute and FSD."""
    cols = ["colour", "shape", "position"] + ["relation"] * any("relation" in r.accuracy for r in reports.values())
    rows = [f"| model | {' | '.join(cols)} | all | FSD |", "| --- " * (len(cols) + 3) + "|"]
    for name, r in reports.items():
        fsd = "n/a" if r.fsd is None else f"{r.fsd:.4f}"
        cells = " | ".join("n/a" if c not in r.accuracy else f"{r.accuracy[c]:.3f}" for c in cols + ["all"])
        rows.append(f"| {name} | {cells} | {fsd} |")
    baseline = next((r.fsd_baseline for r in reports.values() if r.fsd_baseline is not None), None)
    if baseline is not None:
        rows.append(f"\nFSD between two sets of real renders (the floor): {baseline:.4f}; n = "
                    f"{next(iter(reports.values())).n} held-out captions")
    return "\n".join(rows)
