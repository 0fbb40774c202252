"""mobilediffusion.atomic: a file or folder is replaced whole or not at all, and no temporary is left behind."""
import pytest

from mobilediffusion.atomic import atomic_file, fresh_dir, replace_dir


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.") and tmp.suffix == ".tmp"
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_success_replaces_the_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_text("old")
    with atomic_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # the old file stays whole until the block ends
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
    with atomic_file(tmp_path / "fresh.bin") as tmp:  # no file there before
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"


def test_replace_dir_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    tmp = fresh_dir(tmp_path, ".bundle.partial-")
    assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.name.startswith(".bundle.partial-")
    assert fresh_dir(tmp_path, ".bundle.partial-") != tmp  # each call a new folder
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and (dest / "new.txt").read_text() == "new"
    assert not tmp.exists() and not any(p.name.startswith(".bundle.old-") for p in tmp_path.iterdir())
    fresh = fresh_dir(tmp_path, ".other.partial-")
    replace_dir(fresh, tmp_path / "other")  # no folder there before
    assert (tmp_path / "other").is_dir()
