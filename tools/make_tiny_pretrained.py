"""Writes tiny stand-ins for the pretrained files of ``pipelines/pretrained.yaml``, plus an overlay.

Seeded random weights in the real formats (a BERT checkpoint in Google's
layout, a Keras Applications ``*_notop.h5`` file, a YAMNet-interface
SavedModel; see ``multimodal_tf/testing_pretrained.py``), for trying the
pipeline where the real files cannot be downloaded.

Usage::

    python tools/make_tiny_pretrained.py /tmp/tiny
    mmtf data synth /tmp/synth
    mmtf train --config pipelines/pretrained.yaml --config /tmp/tiny/tiny.yaml \\
        --manifest /tmp/synth/manifest.csv --output-dir /tmp/run
"""

from __future__ import annotations

import argparse

from multimodal_tf.testing_pretrained import write_tiny_pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for bert/, the .h5 file, yamnet/ and tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_pretrained(args.out_dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"train with: mmtf train --config pipelines/pretrained.yaml --config {paths['overlay']} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
