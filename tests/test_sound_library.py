"""train/nano/sound_library.py (real recordings from Debian packages as sound-event classes) and
train/nano/qt_resources.py (the .rcc reader). Tests on installed packages skip when they are absent."""
from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile

from train.nano import events
from train.nano import sound_library as sl
from train.nano.qt_resources import QtResourceArchive, ResourceError

GCOMPRIS = sl.SOURCES["gcompris"].root
INSTRUMENTS_RCC = GCOMPRIS / "instruments.rcc"
needs_all = pytest.mark.skipif(bool(sl.missing_packages()),
                               reason="needs apt packages " + " ".join(sl.missing_packages()))
needs_gcompris = pytest.mark.skipif(not INSTRUMENTS_RCC.is_file(), reason="needs apt package gcompris-qt-data")


# --- the .rcc reader, on an archive built here -----------------------------------------------------

def build_rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A version-3 Qt resource archive of {"dir/name": (content, zlib-compressed)}, one level of folders."""
    tree: dict[str, dict] = {}
    for path, entry in files.items():
        *folders, name = path.split("/")
        node = tree
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = entry
    names, name_offsets, data, records = b"", {}, b"", []

    def name_offset(name: str) -> int:
        nonlocal names
        if name not in name_offsets:
            name_offsets[name] = len(names)
            encoded = name.encode("utf-16-be")
            names += struct.pack(">HI", len(encoded) // 2, 0) + encoded
        return name_offsets[name]

    def add_directory(index: int, name: str, children: dict) -> None:
        nonlocal data
        first = len(records)
        records.extend([None] * len(children))
        records[index] = struct.pack(">IHIIQ", name_offset(name), 0x02, len(children), first, 0)
        for i, (child, entry) in enumerate(sorted(children.items())):
            if isinstance(entry, dict):
                add_directory(first + i, child, entry)
            else:
                content, compressed = entry
                stored = struct.pack(">I", len(content)) + zlib.compress(content) if compressed else content
                records[first + i] = struct.pack(">IHHHIQ", name_offset(child), int(compressed), 0, 0, len(data), 0)
                data += struct.pack(">I", len(stored)) + stored

    records.append(None)
    add_directory(0, "", tree)
    tree_block = b"".join(records)
    header_size = 24
    return (b"qres" + struct.pack(">5I", 3, header_size, header_size + len(tree_block),
                                  header_size + len(tree_block) + len(data), 1)
            + tree_block + data + names)


def test_rcc_reader_lists_and_extracts_plain_and_zlib_members(tmp_path):
    text = b"hello " * 100
    archive = tmp_path / "a.rcc"
    archive.write_bytes(build_rcc({"top.txt": (b"plain bytes", False), "sub/deep.txt": (text, True),
                                   "sub/other.bin": (bytes(range(256)), False)}))
    rcc = QtResourceArchive(archive)
    assert rcc.version == 3
    assert rcc.names() == ["sub/deep.txt", "sub/other.bin", "top.txt"]
    assert rcc.read("top.txt") == b"plain bytes" and rcc.compression("top.txt") is None
    assert rcc.read("sub/deep.txt") == text and rcc.compression("sub/deep.txt") == "zlib"
    assert rcc.read("sub/other.bin") == bytes(range(256))
    with pytest.raises(ResourceError):
        rcc.read("sub/missing.txt")


def test_rcc_reader_rejects_damaged_archives(tmp_path):
    good = build_rcc({"x.txt": (b"some text " * 50, True)})
    cases = {"not_rcc": b"RIFF" + good[4:], "short": good[:10], "version": good[:4] + struct.pack(">I", 9) + good[8:],
             "cut": good[:-40]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name in ("not_rcc", "short", "version"):
        with pytest.raises(ResourceError):
            QtResourceArchive(tmp_path / name)
    with pytest.raises(ResourceError):      # the names block is cut: the tree cannot be read
        QtResourceArchive(tmp_path / "cut")
    # a zlib member whose stream is damaged
    damaged = bytearray(good)
    start = good.index(zlib.compress(b"some text " * 50))
    damaged[start + 2:start + 6] = b"\xff\xff\xff\xff"
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(ResourceError):
        QtResourceArchive(tmp_path / "damaged").read("x.txt")


@needs_gcompris
def test_rcc_reader_extracts_gcompris_members():
    rcc = QtResourceArchive(INSTRUMENTS_RCC)
    piano = "gcompris/src/activities/instruments/resource/piano.ogg"
    data = rcc.read(piano)
    assert rcc.compression(piano) is None and data[:4] == b"OggS"
    info = soundfile.info(io.BytesIO(data))
    assert (info.samplerate, info.channels) == (44100, 2) and 11.5 < info.duration < 12.2
    script = "gcompris/src/activities/instruments/instruments.js"
    assert rcc.compression(script) == "zlib"
    assert rcc.read(script).startswith(b"/* GCompris - instruments.js")


# --- the class table (no packages needed) ----------------------------------------------------------

def keyword_pattern(keyword: str) -> re.Pattern:
    """evaluate.py's rule: the keyword at the start of a word, its words separated by any spacing."""
    return re.compile(r"\b" + r"\s+".join(map(re.escape, keyword.split())))


def all_classes() -> list:
    """The sound library's classes and events.py's, each name once (joined classes share wording)."""
    return list(sl.SOUND_CLASSES) + [c for c in events.EVENT_CLASSES if c.name not in sl.SOUND_CLASSES_BY_NAME]


def named_classes(text: str) -> set[str]:
    text = " ".join(re.sub(r"[^a-z0-9\s]", " ", text.lower().replace("'", "")).split())
    return {c.name for c in all_classes() if any(keyword_pattern(k).search(text) for k in c.keywords)}


def test_table_has_many_distinct_classes():
    names = [c.name for c in sl.SOUND_CLASSES]
    assert len(names) == len(set(names)) >= 30
    joined = [n for n in names if n in events.EVENTS_BY_NAME]
    assert len(names) - len(joined) >= 30


def test_keywords_are_unique_across_classes():
    owner: dict[str, str] = {}
    for cls in all_classes():
        for keyword in cls.keywords:
            assert owner.setdefault(keyword, cls.name) == cls.name, (keyword, cls.name, owner[keyword])


def test_each_description_names_only_its_class():
    for cls in sl.SOUND_CLASSES:
        for caption in cls.captions:
            assert named_classes(caption) == {cls.name}, caption
        for text in (cls.background, f"A man is speaking while {cls.background}.", cls.source, cls.noun):
            assert named_classes(text) == {cls.name}, text
    # events.py's own descriptions stay unambiguous beside the new keywords
    for cls in events.EVENT_CLASSES:
        for text in (*cls.captions, cls.background, cls.source, cls.noun):
            assert named_classes(text) == {cls.name}, text


def test_joined_classes_keep_events_wording():
    for cls in sl.SOUND_CLASSES:
        if cls.name in events.EVENTS_BY_NAME:
            e = events.EVENTS_BY_NAME[cls.name]
            assert (cls.captions, cls.background, cls.source, cls.noun, cls.keywords) == \
                   (e.captions, e.background, e.source, e.noun, e.keywords)


def test_every_class_lists_training_and_held_out_recordings():
    for cls in sl.SOUND_CLASSES:
        assert cls.held_out, cls.name
        assert bool(cls.train) != (cls.name in sl.HELD_OUT_ONLY), cls.name
        assert all(spec.split(":", 1)[0] in sl.SOURCES for spec in cls.train + cls.held_out), cls.name


def test_missing_package_removes_only_its_files(monkeypatch, tmp_path):
    monkeypatch.setitem(sl.SOURCES, "scratch", sl.Source("scratch", tmp_path / "absent"))
    assert "scratch" in sl.missing_packages()
    assert sl._expand("scratch:Animal/Dog1.wav") == []


def test_a_renamed_file_is_an_error(monkeypatch, tmp_path):
    (tmp_path / "one.wav").write_bytes(b"")
    monkeypatch.setitem(sl.SOURCES, "scratch", sl.Source("scratch", tmp_path))
    assert sl._expand("scratch:one.wav") == [(str(tmp_path / "one.wav"), None)]
    with pytest.raises(LookupError):
        sl._expand("scratch:two.wav")


# --- the installed library -------------------------------------------------------------------------

@needs_all
def test_split_has_every_class_on_both_sides():
    train, held = sl.split(held_out=False), sl.split(held_out=True)
    library = sl.library()
    assert list(library) == list(train) == list(held) == [c.name for c in sl.SOUND_CLASSES]
    for name in library:
        assert held[name], name
        assert bool(train[name]) != (name in sl.HELD_OUT_ONLY), name
        assert not set(train[name]) & set(held[name]), name
        assert library[name] == train[name] + held[name]
        assert all(f.cls == name for f in library[name])


@needs_all
def test_library_is_deterministic():
    first = sl.library()
    sl._split_files.cache_clear()
    assert sl.library() == first


@needs_all
def test_no_recording_is_listed_twice():
    by_size = defaultdict(list)
    for files in sl.library().values():
        for f in files:
            size = len(sl._archive(f.path).read(f.member)) if f.member else Path(f.path).stat().st_size
            by_size[size].append(f)
    seen: dict[str, str] = {}
    for same_size in by_size.values():
        if len(same_size) > 1:
            for f in same_size:
                data = sl._archive(f.path).read(f.member) if f.member else Path(f.path).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                assert seen.setdefault(digest, f.name) == f.name, (f.name, seen[digest])


@needs_all
@pytest.mark.parametrize("name", ["gcompris/explore_farm_animals.rcc/dog.ogg", "scratch/Animal/Cat.mp3",
                                  "sonic-pi/ambi_piano.flac", "scratch/Animal/Dog1.wav",
                                  "wesnoth/data/core/sounds/ambient/birds1.ogg"])
def test_load_gives_mono_16k_audio(name):
    sound = next(f for files in sl.library().values() for f in files if f.name == name)
    wave = sl.load(sound)
    assert wave.ndim == 1 and wave.dtype == np.float64 and np.isfinite(wave).all()
    expected = sl.seconds(sound) * 16000
    assert abs(len(wave) - expected) <= 0.01 * expected + 2
    assert 0.01 < np.abs(wave).max() < 1.6         # decoded Vorbis and MP3 may overshoot 1 a little
    assert np.abs(wave.mean()) < 0.05


@needs_all
def test_command_line_prints_every_class(capsys):
    assert sl.main([]) == 0
    out = capsys.readouterr().out
    for cls in sl.SOUND_CLASSES:
        assert re.search(rf"^{cls.name} +\d+ ", out, re.M), cls.name
    assert f"({len(sl.SOUND_CLASSES)} classes)" in out
