"""``mmtf data synth``: a deterministic three-modality demo dataset.

Generative process (documented in docs/data.md): a label ``k`` in 0..7 is three
bits ``(b0, b1, b2)``. The image shows a shape chosen by ``(b0, b1)``; the text
names a colour chosen by ``(b1, b2)``; the audio is a tone whose pitch band is
chosen by ``(b0, b2)``. Each modality therefore reveals two of the three bits
(at most 50 % accuracy alone, chance is 12.5 %), while any two together
determine the label, so a fused model beats every single modality. Nuisance
variation: position, size and colour of shapes, pixel noise, synonyms and
filler words, pitch jitter, loudness, duration and noise in the audio; each
modality is absent in ~8 % of examples (never all three).

``task="binary"`` keeps the same media but labels each example with the
majority of its three bits: one modality alone reaches ~75 %, two reach 100 %.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from multimodal_tf.data.audio_io import encode_wav16

NUM_CLASSES = 8
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    0: ("red", "crimson", "scarlet"),
    1: ("green", "emerald", "lime"),
    2: ("blue", "navy", "azure"),
    3: ("yellow", "golden", "amber"),
}
TONES_HZ = (330.0, 660.0, 1320.0, 2640.0)
TEMPLATES = (
    "a {colour} thing",
    "something {adjective} and {colour}",
    "the object looks {colour} to me",
    "{adjective} {colour} item",
    "it is mostly {colour}",
    "{colour}",
)
ADJECTIVES = ("small", "large", "shiny", "old", "new", "odd", "plain", "bright")
MISSING_PROBABILITY = 0.08
SAMPLE_RATE = 16000


def _bits(label: int) -> tuple[int, int, int]:
    return label & 1, (label >> 1) & 1, (label >> 2) & 1


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(0.25, 0.42) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if shape == "triangle":
        return (dy <= radius * 0.7) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    thickness = radius * 0.3
    return (
        ((np.abs(dy) <= thickness) | (np.abs(dx) <= thickness))
        & (np.abs(dy) <= radius)
        & (np.abs(dx) <= radius)
    )


def make_image(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    b0, b1, _ = _bits(label)
    mask = _shape_mask(SHAPES[b0 + 2 * b1], size, rng)
    background = rng.uniform(0, 90, 3)
    colour = rng.uniform(140, 255, 3)
    pixels = np.where(mask[..., None], colour, background) + rng.normal(0, 18, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_text(label: int, rng: np.random.Generator) -> str:
    _, b1, b2 = _bits(label)
    colour = rng.choice(COLOURS[b1 + 2 * b2])
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(colour=colour, adjective=rng.choice(ADJECTIVES))


def make_audio(label: int, rng: np.random.Generator) -> bytes:
    b0, _, b2 = _bits(label)
    duration = rng.uniform(0.5, 1.0)
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    frequency = TONES_HZ[b0 + 2 * b2] * rng.uniform(0.94, 1.06)
    signal = rng.uniform(0.2, 0.7) * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    signal += rng.normal(0, 0.05, t.shape)
    return encode_wav16(np.clip(signal, -1, 1), SAMPLE_RATE)


def synthesize(
    out_dir: str | Path,
    num_examples: int = 1200,
    seed: int = 0,
    test_fraction: float = 0.2,
    task: str = "multiclass",
) -> Path:
    """Writes ``manifest.csv``, ``images/``, ``audio/`` under ``out_dir``; returns the manifest."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    if task not in ("multiclass", "binary"):
        raise ValueError(f"task must be multiclass or binary, got {task!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_examples):
        label = index % NUM_CLASSES
        missing = rng.random(3) < MISSING_PROBABILITY
        if missing.all():
            missing[rng.integers(3)] = False
        example_id = f"synth_{index:05d}"
        image = text = audio = ""
        if not missing[0]:
            image = f"images/{example_id}.png"
            (out_dir / image).write_bytes(make_image(label, rng))
        if not missing[1]:
            text = make_text(label, rng)
        if not missing[2]:
            audio = f"audio/{example_id}.wav"
            (out_dir / audio).write_bytes(make_audio(label, rng))
        split = "test" if rng.random() < test_fraction else "train"
        if task == "binary":
            target = int(sum(_bits(label)) >= 2)
            rows.append([example_id, image, text, audio, target, ("minority", "majority")[target], split])
        else:
            rows.append([example_id, image, text, audio, label, f"class_{label}", split])
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "text", "audio", "label", "label_name", "split"])
        writer.writerows(rows)
    return manifest
