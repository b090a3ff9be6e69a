"""Writing generated images: output plans checked before work, A1111 numbering, exclusive atomic files."""

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.infotext import read_infotext
from sdtorch.outputs import OutputPlan, plan_outputs, write_images

TEXT = "a red circle, «ünïcode» ✓\nNegative prompt: blue\nSteps: 4, Sampler: Euler, CFG scale: 4, Seed: 7"


def generated(seed: int = 7, colour: str = "red", text: str = TEXT) -> Image.Image:
    """An image as the pipeline returns it: its seed and A1111 text in `info`."""
    image = Image.new("RGB", (8, 8), colour)
    image.info.update(parameters=text, seed=seed)
    return image


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_folder_numbering_continues_from_the_highest_number(tmp_path):
    for name in ("00000-1.png", "00003-9.jpg", "notes.txt", "12-not-a-counter"):
        (tmp_path / name).write_bytes(b"user data")
    plan = plan_outputs(tmp_path, 2)
    assert plan == OutputPlan(tmp_path)
    paths = write_images(plan, [generated(5), generated(6)])
    assert [p.name for p in paths] == ["00013-5.png", "00014-6.png"]  # after 12-..., the highest number
    (tmp_path / "12-not-a-counter").unlink()
    (tmp_path / "00014-6.png").unlink()
    assert write_images(plan, [generated(8)])[0].name == "00014-8.png"  # highest left is 00013: 14, never 2
    (tmp_path / "00013-5.png").unlink()
    (tmp_path / "00014-8.png").unlink()
    assert write_images(plan, [generated(8)])[0].name == "00004-8.png"  # 00000, 00003 exist -> 00004
    assert (tmp_path / "00000-1.png").read_bytes() == b"user data"
    assert read_infotext(tmp_path / "00004-8.png") == TEXT
    assert not [n for n in names(tmp_path) if n.startswith(".")]  # no temp file left


def test_new_folder_is_created_and_numbered_from_zero(tmp_path):
    plan = plan_outputs(tmp_path / "a" / "b", 1)
    assert (tmp_path / "a" / "b").is_dir()
    assert write_images(plan, [generated(3)]) == [tmp_path / "a" / "b" / "00000-3.png"]


def test_a_name_taken_meanwhile_moves_on_to_the_next_number(tmp_path, monkeypatch):
    import sdtorch.outputs as outputs

    plan = plan_outputs(tmp_path, 1)
    counted = outputs._next_number

    def racing_writer_takes_it(folder):  # another process links 00000-7.png right after we count
        n = counted(folder)
        if n == 0:
            (folder / "00000-7.png").write_bytes(b"theirs")
        return n

    monkeypatch.setattr(outputs, "_next_number", racing_writer_takes_it)
    assert write_images(plan, [generated(7)]) == [tmp_path / "00001-7.png"]
    assert (tmp_path / "00000-7.png").read_bytes() == b"theirs"


def test_concurrent_writers_to_one_folder_keep_every_image(tmp_path):
    plan = plan_outputs(tmp_path, 1)
    per_writer, colours = 12, {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255)}
    start = threading.Barrier(len(colours))
    written: dict[str, list[Path]] = {}
    errors: list[BaseException] = []

    def writer(colour: str) -> None:
        start.wait()
        try:  # the same seeds in every writer: their names collide unless each name is taken exclusively
            written[colour] = write_images(plan, [generated(seed, colour) for seed in range(per_writer)])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(colour,)) for colour in colours]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    paths = [p for batch in written.values() for p in batch]
    assert len(set(paths)) == len(paths) == per_writer * len(colours)
    assert names(tmp_path) == sorted(p.name for p in paths)  # all present, nothing else (no temp files)
    for colour, batch in written.items():  # no image was overwritten by another writer's
        assert {Image.open(p).getpixel((0, 0)) for p in batch} == {colours[colour]}


def test_single_file_and_batch_names(tmp_path):
    plan = plan_outputs(tmp_path / "out.png", 1)
    assert plan.files == (tmp_path / "out.png",)
    assert write_images(plan, [generated()]) == [tmp_path / "out.png"]
    batch = plan_outputs(tmp_path / "sub" / "x.PNG", 3)
    assert [p.name for p in batch.files] == ["x-0.PNG", "x-1.PNG", "x-2.PNG"]
    assert [read_infotext(p) for p in write_images(batch, [generated()] * 3)] == [TEXT] * 3
    with pytest.raises(InvalidInputError, match="2 file"):
        write_images(plan_outputs(tmp_path / "y.png", 2), [generated()])


def test_existing_file_is_refused_without_overwrite_and_untouched(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"the user's picture")
    with pytest.raises(InvalidInputError, match=r"keep\.png already exists.*overwrite"):
        plan_outputs(target, 1)
    (tmp_path / "x-1.png").write_bytes(b"second of an earlier batch")
    with pytest.raises(InvalidInputError, match=r"x-1\.png already exists"):
        plan_outputs(tmp_path / "x.png", 2)
    assert not (tmp_path / "x-0.png").exists()
    assert target.read_bytes() == b"the user's picture"
    assert write_images(plan_outputs(target, 1, overwrite=True), [generated()]) == [target]
    assert read_infotext(target) == TEXT


def test_file_that_appears_while_generating_is_not_overwritten(tmp_path):
    plan = plan_outputs(tmp_path / "out.webp", 1)
    (tmp_path / "out.webp").write_bytes(b"made meanwhile")
    with pytest.raises(InvalidInputError, match="appeared while generating"):
        write_images(plan, [generated()])
    assert (tmp_path / "out.webp").read_bytes() == b"made meanwhile"
    assert names(tmp_path) == ["out.webp"]


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_carry_the_parameters_in_exif_as_a1111(tmp_path, suffix):
    (path,) = write_images(plan_outputs(tmp_path / f"out{suffix}", 1), [generated()])
    assert read_infotext(path) == TEXT
    with Image.open(path) as image:
        assert image.format == {".webp": "WEBP"}.get(suffix, "JPEG")
        exif = image.info["exif"]
    # UserComment (0x9286) typed UNDEFINED (7), as piexif writes it and A1111 reads it, "UNICODE\0" + UTF-16BE
    assert b"\x92\x86\x00\x07" in exif and b"UNICODE\0" + TEXT.encode("utf-16-be") in exif


@pytest.mark.parametrize("name", ["out.gif", "out.BMP", "a.tiff"])
def test_unsupported_image_suffix_is_refused(tmp_path, name):
    with pytest.raises(InvalidInputError, match=r"cannot write \.\w+ images.*\.png, \.jpg, \.jpeg or \.webp"):
        plan_outputs(tmp_path / name, 1)
    assert names(tmp_path) == []  # no folder of that name


def test_file_where_a_folder_is_meant_and_the_reverse(tmp_path):
    (tmp_path / "outputs").write_bytes(b"a file")
    with pytest.raises(InvalidInputError, match="is a file, not a folder"):
        plan_outputs(tmp_path / "outputs", 1)
    (tmp_path / "pics.png").mkdir()
    with pytest.raises(InvalidInputError, match=r"pics\.png is a folder"):
        plan_outputs(tmp_path / "pics.png", 1, overwrite=True)


@pytest.mark.parametrize("target", ["sub/out", "sub/out.png", "sub"])
def test_unwritable_location_is_refused_before_any_work(tmp_path, target):
    (tmp_path / "sub").write_bytes(b"a file where a folder is needed")
    with pytest.raises(InvalidInputError, match=f"{tmp_path / 'sub'} is a file, not a folder"):
        plan_outputs(tmp_path / target, 1)
    assert (tmp_path / "sub").read_bytes() == b"a file where a folder is needed"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(InvalidInputError, match=f"cannot write images to {folder}: Permission denied"):
            plan_outputs(folder, 1)
    finally:
        folder.chmod(0o700)


def test_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    plan = plan_outputs(tmp_path, 1)

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an ima")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"00000-7\.png: No space left on device"):
        write_images(plan, [generated()])
    assert names(tmp_path) == []


def test_file_systems_without_hard_links_still_create_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    plan = plan_outputs(tmp_path, 1)
    assert write_images(plan, [generated(1), generated(1)]) == [tmp_path / "00000-1.png", tmp_path / "00001-1.png"]
    assert read_infotext(tmp_path / "00001-1.png") == TEXT
    single = plan_outputs(tmp_path / "one.jpg", 1)
    (tmp_path / "one.jpg").write_bytes(b"made meanwhile")
    with pytest.raises(InvalidInputError, match="appeared while generating"):
        write_images(single, [generated()])
    assert (tmp_path / "one.jpg").read_bytes() == b"made meanwhile"
    assert not [n for n in names(tmp_path) if n.startswith(".")]
