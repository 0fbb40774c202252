"""Bad checkpoints: each is one clear CheckpointError naming the problem, raised before heavy work."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mobilediffusion.errors import CheckpointError
from mobilediffusion.weights.formats import detect
from mobilediffusion.weights.io import read_tensors
from mobilediffusion.weights.keymap import KeyMap, load_state


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        detect(tmp_path / "nope.safetensors")


def test_truncated_safetensors(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|not a readable|not a complete"):
        read_tensors(f)
    with pytest.raises(CheckpointError):
        detect(f)


def test_not_a_safetensors_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("hello, I am text")
    with pytest.raises(CheckpointError, match="safetensors"):
        detect(f)
    g = tmp_path / "weights.onnx"
    g.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported file type"):
        detect(g)


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    f = tmp_path / "taesd_decoder.pth"
    f.write_bytes(pickle.dumps({"1.weight": Evil()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_tensors(f)


def test_unknown_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown layout.*readme.txt"):
        detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match="ControlNetModel"):
        detect(tmp_path)


def test_unknown_keys_in_a_file(tmp_path):
    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(f))
    with pytest.raises(CheckpointError, match="lora_unet_down.alpha"):
        detect(f)


def test_keymap_rules_and_strict_loading():
    km = KeyMap("toy", ((r"enc\..*", None), (r"lin(\d)\.(weight|bias)", r"layers.\1.\2")))
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList([torch.nn.Linear(2, 3), torch.nn.Conv2d(3, 4, 1)])
    state = {
        "enc.x": torch.zeros(1),  # declared unused
        "lin0.weight": torch.ones(3, 2), "lin0.bias": torch.ones(3),
        "lin1.weight": torch.full((4, 3), 2.0), "lin1.bias": torch.ones(4),  # linear -> 1x1 conv reshape
    }
    load_state(net, state, km)
    assert net.layers[1].weight.shape == (4, 3, 1, 1) and net.layers[1].weight.eq(2).all()
    with pytest.raises(CheckpointError, match="missing 1 keys: layers.1.bias"):
        load_state(net, {k: v for k, v in state.items() if k != "lin1.bias"}, km)
    with pytest.raises(CheckpointError, match="not part of a toy checkpoint: other"):
        load_state(net, {**state, "other": torch.ones(1)}, km)
    with pytest.raises(CheckpointError, match=r"layers.0.weight \(3, 5\) vs \(3, 2\)"):
        load_state(net, {**state, "lin0.weight": torch.ones(3, 5)}, km)


def test_cached_per_file_reads_an_unchanged_file_once_and_a_changed_one_again(tmp_path):
    import os

    from mobilediffusion.weights.io import cached_per_file

    reads = []

    @cached_per_file
    def size_of(p):
        reads.append(p)
        return p.stat().st_size

    f = tmp_path / "a.bin"
    f.write_bytes(b"1234")
    assert size_of(f) == 4 and size_of(str(f)) == 4 and size_of(tmp_path / "." / "a.bin") == 4
    assert len(reads) == 1  # the same resolved file, unchanged
    f.write_bytes(b"123456")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert size_of(f) == 6 and len(reads) == 2
