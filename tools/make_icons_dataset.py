"""Builds the `icons` dataset (image + text) from Debian icon-theme packages.

Each example is one icon of a freedesktop icon theme: the image is the
theme's PNG, the text is the icon name split into words
(``document-open`` -> ``document open``) and the label is the theme's
context folder (actions, apps, devices, mimetypes, places, status, ...).
The test split is one whole theme never seen in training (``--test-theme``),
so the score measures generalisation to a new artistic style, not recall
of near-identical drawings.

    apt-get download gnome-icon-theme mate-icon-theme tango-icon-theme \\
        lxde-icon-theme oxygen-icon-theme elementary-xfce-icon-theme
    python tools/make_icons_dataset.py *.deb --out /work/data-extra/icons

Inputs are ``.deb`` files (read with the standard library: ``ar`` + tar) or
folders holding ``usr/share/icons`` (e.g. an unpacked package). Writes the
manifest layout of ../shared/data/README.md: ``manifest.csv`` (extra
columns ``theme,package,version,icon,source_px``), ``images/*.png`` and
``SOURCES.txt`` with each package's version and the licences from its
``debian/copyright``. Only regular PNG files count: symlinked aliases and
``-symbolic`` icons (monochrome glyphs meant to be recoloured) are skipped,
and an image identical (after resizing) to one already taken is dropped, so
no test image also appears in training.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import lzma
import random
import re
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Context folder names as the themes spell them -> the label. The
# freedesktop Icon Naming Specification names these contexts; elementary
# spells "mimetypes" as "mimes".
CONTEXTS = {
    "actions": "actions",
    "apps": "apps",
    "categories": "categories",
    "devices": "devices",
    "emblems": "emblems",
    "emotes": "emotes",
    "mimetypes": "mimetypes",
    "mimes": "mimetypes",
    "places": "places",
    "status": "status",
}
SIZE = re.compile(r"^(\d+)(x\d+)?(@\d+x)?$")
COLUMNS = ["id", "image", "text", "audio", "label", "label_name", "split"]
EXTRA = ["theme", "package", "version", "icon", "source_px"]


@dataclass
class Icon:
    theme: str
    context: str
    name: str
    px: int
    data: bytes
    package: str
    version: str


@dataclass
class Package:
    name: str
    version: str
    licences: list[str]
    files: dict[str, bytes]  # path inside the package -> bytes (PNGs and copyright only)


def _ar_members(blob: bytes, source: str) -> dict[str, bytes]:
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{source}: not a Debian package (no ar header)")
    members, offset = {}, 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = blob[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
    return members


def _tar(members: dict[str, bytes], stem: str, source: str) -> tarfile.TarFile:
    for name, data in members.items():
        if name.startswith(stem):
            if name.endswith(".zst"):
                raise ValueError(
                    f"{source}: {name} is zstd-compressed; unpack it with dpkg-deb -x and pass the folder"
                )
            raw = lzma.decompress(data) if name.endswith(".xz") else data
            return tarfile.open(fileobj=io.BytesIO(raw), mode="r:*")
    raise ValueError(f"{source}: no {stem}.* member")


def read_deb(path: Path) -> Package:
    members = _ar_members(path.read_bytes(), str(path))
    control = _tar(members, "control.tar", str(path))
    fields = {}
    for member in control.getmembers():
        if member.name.endswith("/control") or member.name == "control":
            for line in control.extractfile(member).read().decode().splitlines():
                key, _, value = line.partition(":")
                if value and not line.startswith(" "):
                    fields[key] = value.strip()
    data = _tar(members, "data.tar", str(path))
    files = {}
    for member in data.getmembers():
        wanted = member.name.endswith(".png") or member.name.endswith("/copyright")
        if member.isfile() and wanted:
            files[member.name.removeprefix("./")] = data.extractfile(member).read()
    return _package(fields.get("Package", path.stem), fields.get("Version", "?"), files)


def read_folder(path: Path) -> Package:
    files = {}
    for file in path.rglob("*"):
        wanted = file.suffix == ".png" or file.name == "copyright"
        if wanted and file.is_file() and not file.is_symlink():
            files[str(file.relative_to(path))] = file.read_bytes()
    return _package(path.name, "unknown (folder)", files)


def _package(name: str, version: str, files: dict[str, bytes]) -> Package:
    licences = set()
    for path, data in files.items():
        if path.endswith("/copyright"):
            licences |= {
                m.strip() for m in re.findall(r"^License:(.*)$", data.decode(errors="replace"), re.M)
            }
    return Package(name, version, sorted(licences), files)


def icons_of(package: Package) -> list[Icon]:
    """The package's context-folder PNGs; theme variants (``X-dark`` beside ``X``) are skipped."""
    by_theme: dict[str, list[tuple[str, str, int, bytes]]] = defaultdict(list)
    for path, data in package.files.items():
        parts = path.split("/")
        if not path.endswith(".png") or parts[:3] != ["usr", "share", "icons"] or len(parts) < 6:
            continue
        theme, middle, name = parts[3], parts[4:-1], parts[-1][: -len(".png")]
        contexts = [CONTEXTS[p] for p in middle if p in CONTEXTS]
        sizes = [int(SIZE.match(p).group(1)) for p in middle if SIZE.match(p) and "@" not in p]
        if len(contexts) != 1 or len(sizes) != 1 or name.endswith("-symbolic"):
            continue
        by_theme[theme].append((contexts[0], name, sizes[0], data))
    themes = sorted(by_theme)
    variants = {t for t in themes for base in themes if t != base and t.startswith(base + "-")}
    return [
        Icon(theme, context, name, px, data, package.name, package.version)
        for theme in themes
        if theme not in variants
        for context, name, px, data in by_theme[theme]
    ]


def pick_size(icons: list[Icon], target: int) -> list[Icon]:
    """One image per (theme, context, name): the smallest size >= target, else the largest."""
    groups: dict[tuple[str, str, str], list[Icon]] = defaultdict(list)
    for icon in icons:
        groups[(icon.theme, icon.context, icon.name)].append(icon)
    chosen = []
    for group in groups.values():
        big = [i for i in group if i.px >= target]
        chosen.append(min(big, key=lambda i: i.px) if big else max(group, key=lambda i: i.px))
    return chosen


def words(name: str) -> str:
    """``gnome-fs-directory_accept`` -> ``gnome fs directory accept``."""
    return " ".join(w for w in re.split(r"[-_.\s]+", name) if w)


def render(icon: Icon, size: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(icon.data)).convert("RGBA")
    except Exception as error:  # noqa: BLE001 (PIL raises several types for a bad file)
        raise ValueError(f"{icon.package}: {icon.theme}/{icon.context}/{icon.name}.png: {error}") from error
    return image if image.size == (size, size) else image.resize((size, size), Image.LANCZOS)


def build(args: argparse.Namespace) -> int:
    packages = [read_deb(p) if p.is_file() else read_folder(p) for p in args.inputs]
    icons = pick_size([i for p in packages for i in icons_of(p)], args.size)
    themes = sorted({i.theme for i in icons})
    if args.test_theme not in themes:
        raise SystemExit(f"--test-theme {args.test_theme!r} is not among the themes found: {themes}")
    rng = random.Random(args.seed)
    # Test theme first, so that a training image identical to a test image is the one dropped.
    icons.sort(key=lambda i: (i.theme != args.test_theme, i.theme, i.context, i.name))
    groups: dict[tuple[str, str], list[Icon]] = defaultdict(list)
    for icon in icons:
        groups[(icon.theme, icon.context)].append(icon)
    seen, kept = set(), []
    for key in sorted(groups, key=lambda k: (k[0] != args.test_theme, k)):
        group = groups[key]
        rng.shuffle(group)
        taken = 0
        for icon in group:
            if taken == args.per_class:
                break
            image = render(icon, args.size)
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            kept.append((icon, image))
            taken += 1
    train = Counter(i.context for i, _ in kept if i.theme != args.test_theme)
    test = Counter(i.context for i, _ in kept if i.theme == args.test_theme)
    labels = sorted(c for c in train if train[c] >= args.min_train and test[c] >= args.min_test)
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for icon, image in kept:
        if icon.context not in labels:
            continue
        ident = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{icon.theme}__{icon.context}__{icon.name}")
        image.save(out / "images" / f"{ident}.png")
        rows.append(
            {
                "id": ident,
                "image": f"images/{ident}.png",
                "text": words(icon.name),
                "audio": "",
                "label": labels.index(icon.context),
                "label_name": icon.context,
                "split": "test" if icon.theme == args.test_theme else "train",
                "theme": icon.theme,
                "package": icon.package,
                "version": icon.version,
                "icon": icon.name,
                "source_px": icon.px,
            }
        )
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + EXTRA)
        writer.writeheader()
        writer.writerows(rows)
    write_sources(out, packages, rows, args)
    print(f"{len(rows)} examples, {len(labels)} classes {labels}, test theme {args.test_theme}")
    for theme in themes:
        counts = Counter(r["label_name"] for r in rows if r["theme"] == theme)
        print(f"  {theme}: {sum(counts.values())} {dict(sorted(counts.items()))}")
    return 0


def write_sources(out: Path, packages: list[Package], rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "Icons from Debian icon-theme packages (freedesktop icon themes).",
        "Image: the theme's PNG, resized to "
        f"{args.size}x{args.size} RGBA; text: the icon name split into words; label: the",
        "theme's context folder. Test split: the whole theme "
        f"{args.test_theme!r}, never seen in training.",
        f"Built by tools/make_icons_dataset.py (--size {args.size} --per-class {args.per_class} "
        f"--seed {args.seed}).",
        "",
    ]
    used = Counter(r["package"] for r in rows)
    for package in packages:
        if used[package.name]:
            licences = "; ".join(package.licences) or "see the package's copyright file"
            lines.append(
                f"{package.name} {package.version}: {used[package.name]} icons. Licences: {licences}"
            )
    (out / "SOURCES.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help=".deb files or unpacked package folders")
    parser.add_argument(
        "--out", type=Path, required=True, help="dataset folder to write (outside the repository)"
    )
    parser.add_argument(
        "--test-theme", default="elementary-xfce", help="the theme held out as the test split"
    )
    parser.add_argument("--size", type=int, default=48, help="output image side in pixels")
    parser.add_argument(
        "--per-class", type=int, default=60, help="at most this many icons per theme and context"
    )
    parser.add_argument("--min-train", type=int, default=40, help="a context needs this many training icons")
    parser.add_argument("--min-test", type=int, default=10, help="and this many test icons to be a class")
    parser.add_argument("--seed", type=int, default=0)
    return build(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
