"""tools/make_icons_dataset.py on tiny icon themes packed as a real .deb and as a folder."""

from __future__ import annotations

import csv
import importlib.util
import io
import lzma
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "make_icons_dataset", ROOT / "tools" / "make_icons_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _png(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_xz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return lzma.compress(buffer.getvalue())


def _deb(path: Path, package: str, files: dict[str, bytes], links: dict[str, str]) -> None:
    """A Debian package as dpkg writes it: ar of debian-binary, control.tar.xz, data.tar.xz."""
    control = f"Package: {package}\nVersion: 1.2-3\nArchitecture: all\n".encode()
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar_xz({"./control": control}),
        "data.tar.xz": _tar_xz(files, links),
    }
    blob = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        blob += header + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(blob)


def test_builds_a_manifest_split_by_theme(tool, tmp_path):
    icons = "./usr/share/icons"
    files = {"./usr/share/doc/pkg-a/copyright": b"Files: *\nLicense: LGPL-3+\n"}
    for i in range(4):  # theme A: 4 actions (two sizes each), 4 places; one symbolic, one dark variant
        files[f"{icons}/A/48x48/actions/go-{i}.png"] = _png(i, 48)
        files[f"{icons}/A/16x16/actions/go-{i}.png"] = _png(100 + i, 16)
        files[f"{icons}/A/48x48/places/folder_{i}.png"] = _png(10 + i, 48)
    files[f"{icons}/A/48x48/places/user-home-symbolic.png"] = _png(50, 48)
    files[f"{icons}/A-dark/48x48/places/folder-dark.png"] = _png(51, 48)
    links = {f"{icons}/A/48x48/actions/alias.png": "go-0.png"}
    _deb(tmp_path / "pkg-a.deb", "pkg-a", files, links)
    folder = tmp_path / "pkg-b"  # theme B (elementary layout: context/size, "mimes"), unpacked
    for i in range(3):
        for context in ("actions", "places"):
            target = folder / "usr/share/icons/B" / context / "32" / f"{context}-{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_png(20 + i if context == "actions" else 30 + i, 32))
    (folder / "usr/share/icons/B/mimes/32").mkdir(parents=True)
    (folder / "usr/share/icons/B/mimes/32/text-plain.png").write_bytes(_png(40, 32))
    # B's actions-0 is A's go-0 at 48 px: the same picture once resized, dropped from training.
    (folder / "usr/share/icons/B/actions/32/actions-0.png").unlink()
    (folder / "usr/share/icons/B/actions/48").mkdir(parents=True)
    (folder / "usr/share/icons/B/actions/48/go-0.png").write_bytes(_png(0, 48))

    out = tmp_path / "icons"
    args = ["--out", str(out), "--test-theme", "B", "--size", "24", "--min-train", "2", "--min-test", "2"]
    assert tool.main([str(tmp_path / "pkg-a.deb"), str(folder)] + args) == 0

    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_theme = {t: sorted(r["icon"] for r in rows if r["theme"] == t) for t in ("A", "B")}
    # A: go-0 dropped (same picture as B's test icon), alias/symbolic/dark variant never read.
    assert sorted(by_theme["A"]) == ["folder_0", "folder_1", "folder_2", "folder_3", "go-1", "go-2", "go-3"]
    # B: mimetypes has no training icon, so it is no class.
    assert sorted(by_theme["B"]) == ["actions-1", "actions-2", "go-0", "places-0", "places-1", "places-2"]
    assert {r["split"] for r in rows if r["theme"] == "A"} == {"train"}
    assert {r["split"] for r in rows if r["theme"] == "B"} == {"test"}
    assert {(r["label"], r["label_name"]) for r in rows} == {("0", "actions"), ("1", "places")}
    folder_0 = next(r for r in rows if r["icon"] == "folder_0")
    assert folder_0["text"] == "folder 0" and folder_0["audio"] == ""
    assert folder_0["package"] == "pkg-a" and folder_0["version"] == "1.2-3" and folder_0["source_px"] == "48"
    go_1 = next(r for r in rows if r["icon"] == "go-1")
    assert go_1["source_px"] == "48", "the smallest size >= --size is taken, not the 16 px one"
    image = Image.open(out / go_1["image"])
    assert image.size == (24, 24) and image.mode == "RGBA"
    expected = Image.open(io.BytesIO(_png(1, 48))).convert("RGBA").resize((24, 24), Image.LANCZOS)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    sources = (out / "SOURCES.txt").read_text()
    assert "pkg-a 1.2-3: 7 icons. Licences: LGPL-3+" in sources and "'B'" in sources


def test_names_an_unknown_test_theme_and_a_bad_package(tool, tmp_path):
    folder = tmp_path / "pkg"
    (folder / "usr/share/icons/A/48x48/apps").mkdir(parents=True)
    (folder / "usr/share/icons/A/48x48/apps/x.png").write_bytes(_png(0, 48))
    with pytest.raises(SystemExit, match=r"--test-theme 'nope' is not among the themes found: \['A'\]"):
        tool.main([str(folder), "--out", str(tmp_path / "o"), "--test-theme", "nope"])
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"bad\.deb: not a Debian package"):
        tool.main([str(tmp_path / "bad.deb"), "--out", str(tmp_path / "o")])
