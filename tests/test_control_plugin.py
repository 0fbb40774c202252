"""The default model's control plugin: the shipped file places objects where its edge map / scribble says (held-out
scenes, one step), the training stage that made it runs from the CLI, and the file format round-trips."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def default():
    from mobilediffusion.pipeline import load_pipeline

    return load_pipeline()


def test_shipped_plugin_places_the_object(default):
    """Captions without position words: without the plugin the object lands anywhere; with it, on the scene's."""
    from mobilediffusion.control.load import load_control, resolve_control, shipped_controls
    from mobilediffusion.train.config import default_config_path, load_stage_config
    from mobilediffusion.train.control import control_iou

    assert "md-shapes-scribble" in shipped_controls()
    plugin = load_control(resolve_control("md-shapes-scribble"), base=default.unet)
    assert 100_000 < sum(p.numel() for p in plugin.parameters()) < 1_000_000  # a few hundred thousand
    scenes = load_stage_config(default_config_path("control")).data
    r = control_iou(default, plugin, scenes, n=32, thickness=1)
    assert r["unplaced"]["with"]["iou"] > 0.6 and r["unplaced"]["without"]["iou"] < 0.2, r
    assert r["placed"]["with"]["iou"] > r["placed"]["without"]["iou"], r


def test_plugin_runs_through_generate_cli(tmp_path):
    """As typed: preprocess a scene into edges, generate with the shipped plugin; the object sits on the edges."""
    from PIL import Image

    from mobilediffusion.train.control import object_mask
    from mobilediffusion.train.data import Scene, SceneConfig, render

    scene = render(Scene("blue", "square", "bottom left"), SceneConfig(resolution=128))  # the default's size
    Image.fromarray(scene).save(tmp_path / "scene.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mobilediffusion.cli", *a], capture_output=True,  # noqa
                                    text=True)
    r = run("preprocess", "canny", str(tmp_path / "scene.png"), "-o", str(tmp_path / "edges.png"))
    assert r.returncode == 0, r.stderr
    r = run("generate", "a blue square on a white background", "-o", str(tmp_path / "out.png"), "--control",
            f"md-shapes-scribble:{tmp_path / 'edges.png'}")
    assert r.returncode == 0, r.stderr
    got = object_mask(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")))
    truth = object_mask(scene)
    assert (got & truth).sum() / (got | truth).sum() > 0.5


def test_control_stage_trains_and_writes_a_loadable_plugin(tmp_path):
    """`train control` with a small config: the adapter learns (loss falls), the file loads with its config."""
    from mobilediffusion.control.load import load_control, native_control_info
    from mobilediffusion.train.config import default_config_path

    cfg = json.loads(default_config_path("control").read_text())
    cfg.update(steps=15, pool_size=32, batch_size=8, warmup=3, checkpoint_every=15, log_every=3, threads=2)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "mobilediffusion.cli", "train", "control", "--config",
                        str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    info = native_control_info(tmp_path / "run" / "control.safetensors")
    assert info["kind"] == "t2i_adapter" and info["model"] == "md-shapes-128" and info["config"]["unshuffle"] == 8
    model = load_control(tmp_path / "run" / "control.safetensors")
    assert model.config.channels == (48, 96, 128)  # the default's UNet widths


def test_native_control_file_round_trips_and_bad_ones_are_refused(tmp_path):
    from safetensors.torch import save_file

    from mobilediffusion.control.adapter import Adapter, AdapterConfig
    from mobilediffusion.control.load import NATIVE_CONTROL_KEY, load_control, save_native_control
    from mobilediffusion.errors import CheckpointError, ConfigError

    a = Adapter(AdapterConfig("light", 1, (8, 16), 1, 3, False, 4)).eval()
    path = save_native_control(tmp_path / "a.safetensors", a, model="x", hint="test")
    b = load_control(path)
    hint = torch.rand(1, 1, 16, 16)
    for fa, fb in zip(a.features(hint), b.features(hint)):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    save_file({"w": torch.zeros(1)}, tmp_path / "odd.safetensors",
              metadata={NATIVE_CONTROL_KEY: json.dumps({"kind": "lora"})})
    with pytest.raises(CheckpointError, match="kind 'lora'"):
        load_control(tmp_path / "odd.safetensors")
    with pytest.raises(ConfigError, match="shipped plugins: md-shapes-scribble"):
        from mobilediffusion.control.load import resolve_control

        resolve_control("no-such-plugin")


@pytest.mark.skipif(__import__("os").environ.get("MD_HEAVY_TESTS") != "1",
                    reason="opt-in: two accelerate launches of 2 processes (gloo); set MD_HEAVY_TESTS=1")
def test_control_stage_on_two_processes_equals_one(tmp_path):
    """`accelerate launch` with 2 processes (DDP over gloo on the CPU): the same weights as 1 process (<= 1e-5), each
    sample drawn the same; stopped and resumed on 2 processes: the uninterrupted weights."""
    from safetensors.torch import load_file

    from mobilediffusion.train.config import default_config_path

    cfg = json.loads(default_config_path("control").read_text())
    # lr 1e-4: at the recipe's 1e-3 the 128 px run grows any change in summation order to ~1.1e-5 in 20 steps, within
    # one process too (1 thread vs 2: 1.1e-5); at 1e-4 one process on 1 or 2 threads and two processes all agree to
    # 5.5e-8, so what is left to see is the processes' split of the batch
    cfg.update(steps=20, pool_size=64, batch_size=8, warmup=5, checkpoint_every=10, log_every=5, lr=1e-4)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    train = [sys.executable, "-m", "mobilediffusion.cli", "train", "control", "--config", str(tmp_path / "c.json"), "-q"]
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mobilediffusion.cli", *train[3:]]
    for args in (train + ["--out", str(tmp_path / "one")], ddp + ["--out", str(tmp_path / "two")],
                 ddp + ["--out", str(tmp_path / "part"), "--stop-after", "10"], ddp + ["--out", str(tmp_path / "part"),
                                                                             "--resume"]):
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    one, two, part = (load_file(str(tmp_path / d / "control.safetensors")) for d in ("one", "two", "part"))
    for k in one:
        assert ((two[k] - one[k]).norm() / one[k].norm()).item() <= 1e-5, k  # measured 5.3e-8
        assert torch.equal(part[k], two[k]), k
