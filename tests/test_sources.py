"""Training data people have: image folders (sidecar captions, kohya repeat folders), Hugging Face metadata files and
webdataset shards give the same (key, caption, image) pairs for the same files; odd files are made RGB or skipped
with a count; aspect-ratio buckets never upscale."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from mobilediffusion.errors import ConfigError
from mobilediffusion.train.images import BucketConfig, bucket_for, buckets, decode, fit_to_bucket
from mobilediffusion.train.sources import FolderSource, MetadataSource, ShardSource, open_source


def _picture(w, h, seed):
    g = np.random.default_rng(seed)
    return (g.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Eight plain images in two folders with sidecar captions (one .caption, one without any)."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    pictures = {}
    for i in range(8):
        key = f"{'sub/' if i % 2 else ''}img_{i:02d}"
        pictures[key] = _picture(96 + 8 * i, 80 + 4 * i, i)
        Image.fromarray(pictures[key]).save(root / f"{key}.png")
        if i == 3:
            (root / f"{key}.caption").write_text("  a caption file  \n")
        elif i != 5:
            (root / f"{key}.txt").write_text(f"picture number {i}")
    return root, pictures


def _pairs(source):
    return {item.key: (item.caption, item.image.tobytes()) for item in source}


def test_folder_metadata_and_shards_give_the_same_pairs(folder, tmp_path):
    import webdataset as wds

    root, pictures = folder
    from_folder = _pairs(FolderSource(root))
    assert set(from_folder) == set(pictures)
    assert from_folder["sub/img_03"][0] == "a caption file" and from_folder["sub/img_05"][0] == ""
    assert from_folder["img_00"] == ("picture number 0", pictures["img_00"].tobytes())
    rows = [{"file_name": f"{k}.png", "text": c} for k, (c, _) in sorted(from_folder.items())]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(tmp_path / "metadata.csv", "w") as f:
        f.write("file_name,text\n" + "".join(f"data/{r['file_name']},\"{r['text']}\"\n" for r in rows))
    assert _pairs(open_source(root)) == from_folder  # a folder with metadata.jsonl reads it
    assert _pairs(MetadataSource(tmp_path / "metadata.csv")) == {f"data/{k}": v for k, v in from_folder.items()}
    (tmp_path / "shards").mkdir()
    for n in range(2):  # two shards, the samples split between them, keys the relative paths
        with wds.TarWriter(str(tmp_path / "shards" / f"{n:04d}.tar")) as sink:
            for k, (caption, _) in sorted(from_folder.items())[n::2]:
                sink.write({"__key__": k, "png": (root / f"{k}.png").read_bytes(), "txt": caption})
    shards = open_source(str(tmp_path / "shards" / "{0000..0001}.tar"))
    assert isinstance(shards, ShardSource) and _pairs(shards) == from_folder
    # shares for several processes: each item in exactly one share, the source order restored from `order`; two
    # shards on 2 processes split by shard, on 3 processes sample by sample
    for source in (FolderSource(root), MetadataSource(tmp_path / "metadata.csv"), shards):
        whole = [(i.key, i.order) for i in source]
        for world in (2, 3):
            parts = [[(i.key, i.order) for i in source.part(rank, world)] for rank in range(world)]
            assert all(parts) and sorted(sum(parts, []), key=lambda e: e[1]) == whole
    assert [i.key for i in shards.part(1, 2)] == [k for k, _ in sorted(from_folder.items())[1::2]]  # shard 0001


def test_kohya_repeat_folders_and_orphan_captions(tmp_path):
    root = tmp_path / "train"
    (root / "3_sks dog").mkdir(parents=True)
    (root / "1_style").mkdir()
    Image.fromarray(_picture(64, 64, 1)).save(root / "3_sks dog" / "a.png")
    Image.fromarray(_picture(64, 64, 2)).save(root / "1_style" / "b.png")
    (root / "1_style" / "b.txt").write_text("a painting")
    (root / "1_style" / "gone.txt").write_text("its image was deleted")
    source = FolderSource(root)
    items = list(source)
    assert [(i.key, i.caption, i.repeat) for i in items] == [
        ("1_style/b", "a painting", 0), ("3_sks dog/a", "sks dog", 0), ("3_sks dog/a", "sks dog", 1),
        ("3_sks dog/a", "sks dog", 2)]
    assert source.skipped == {"caption without image": 1}


def test_odd_files_are_made_rgb_or_skipped_with_a_count(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    yy, xx = np.mgrid[0:64, 0:80]  # smooth (JPEG keeps it), and no symmetry (a wrong rotation shows)
    rgb = np.stack([xx * 3, yy * 3, (xx + 2 * yy) % 256], -1).astype(np.uint8)
    # CMYK JPEG, 16-bit greyscale PNG, RGBA PNG (half transparent), EXIF-rotated JPEG (orientation 6), palette PNG
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    grey16 = (np.arange(80 * 64).reshape(64, 80) * 12).astype(np.uint16)
    Image.fromarray(grey16).save(root / "grey16.png")  # mode I;16
    rgba = np.dstack([rgb, np.where(np.arange(80) < 40, 255, 0)[None, :].repeat(64, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.png").write_text("text in a .png")
    Image.fromarray(_picture(40, 30, 4)).save(root / "tiny.png")
    source = FolderSource(root)
    items = {i.key: i.image for i in source}
    assert set(items) == {"cmyk", "grey16", "rgba", "rotated", "palette"}
    assert source.skipped == {"unreadable": 2, "smaller than 64 px": 1}
    for image in items.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert np.abs(items["cmyk"].astype(int) - rgb).mean() < 8
    np.testing.assert_array_equal(items["grey16"][..., 0], (grey16.astype(np.int64) * 255 // 65535).astype(np.uint8))
    np.testing.assert_array_equal(items["rgba"][:, 40:], 255)  # transparent: white
    np.testing.assert_array_equal(items["rgba"][:, :40], rgb[:, :40])
    assert items["rotated"].shape == (80, 64, 3)  # EXIF orientation 6: turned upright
    assert np.abs(items["rotated"].astype(int) - np.rot90(rgb, -1)).mean() < 8


def test_buckets_never_upscale_and_keep_the_aspect():
    cfg = BucketConfig(resolution=256, step=64)
    assert buckets(cfg)[0] == (256, 256)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 256 * 256 for w, h in buckets(cfg))
    g = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(g.integers(64, 900)), int(g.integers(64, 900))
        b = bucket_for(w, h, cfg)
        assert b is not None and b[0] <= w and b[1] <= h, (w, h, b)
    assert bucket_for(512, 256, cfg) == (320, 192)  # the nearest aspect to 2:1 among buckets inside 512 x 256
    assert bucket_for(1000, 1000, cfg) == (256, 256)
    assert bucket_for(100, 70, cfg) == (64, 64) and bucket_for(40, 300, cfg) is None
    image = _picture(300, 200, 5)
    out = fit_to_bucket(image, bucket_for(300, 200, cfg), cfg)
    assert out.shape == (bucket_for(300, 200, cfg)[1], bucket_for(300, 200, cfg)[0], 3)
    same = fit_to_bucket(image, (256, 200), BucketConfig(resolution=512, step=64))
    np.testing.assert_array_equal(same, image[:, 22:278])  # the height fits: no resize, only the centre crop
    rnd = BucketConfig(resolution=256, step=64, crop="random", flip=True)
    crops = {fit_to_bucket(image, (128, 128), rnd, np.random.default_rng(s)).tobytes() for s in range(6)}
    assert len(crops) > 1
    with pytest.raises(ConfigError, match="never upscale"):
        fit_to_bucket(image, (320, 256), cfg)


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        open_source(tmp_path / "empty")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "a.txt").write_text("a cat")
    with pytest.raises(ConfigError, match=r"holds no images \(1 caption files without their images\)"):
        open_source(tmp_path / "captions")
    (tmp_path / "m.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(ConfigError, match="has no file_name"):
        open_source(tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="do not exist"):
        open_source(str(tmp_path / "{0000..0003}.tar"))


def test_a_damaged_shard_is_counted_and_the_rest_read(tmp_path):
    import webdataset as wds

    for n in range(2):
        with wds.TarWriter(str(tmp_path / f"{n}.tar")) as sink:
            buf = io.BytesIO()
            Image.fromarray(_picture(64, 64, n)).save(buf, format="PNG")
            sink.write({"__key__": f"s{n}", "png": buf.getvalue(), "txt": f"sample {n}"})
    data = (tmp_path / "1.tar").read_bytes()
    (tmp_path / "1.tar").write_bytes(data[: len(data) // 3])
    source = open_source(str(tmp_path / "{0..1}.tar"))
    assert [(i.key, i.caption) for i in source] == [("s0", "sample 0")]
    assert source.skipped == {"damaged shard": 1}


def test_decode_refuses_what_is_not_an_image():
    from mobilediffusion.train.images import UnreadableImage

    with pytest.raises(UnreadableImage):
        decode(b"not an image")
