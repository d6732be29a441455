"""Lists the tensorflow-text ops a tensorflow-text wheel registers, without running it.

TF Serving images embed an older tensorflow-text than the one installed here
(``tensorflow/serving:2.17.1`` .. ``2.19.x`` embed 2.12.1), so ``mmtf export
--target-serving`` needs that version's op names. A wheel for another TF
cannot be imported next to ours, but ``REGISTER_OP("Name")`` leaves each op
name as a NUL-terminated string in the kernels' shared objects (what
``strings`` prints). This script keeps the names of the ops the *installed*
tensorflow-text registers that also occur, exactly, in the wheel: ops are
never removed between versions, so an installed op that is absent from the
wheel is an op the older version does not have. Checked on 2.12.1: every
installed 2.17 op is found but ``TFText>Utf8Binarize`` (added in 2.13), and
``TFText>RoundRobinTrim`` is absent as FACTS.md says.

Usage::

    pip download --no-deps tensorflow-text==2.12.1 -d /tmp/w
    python tools/text_ops_from_wheel.py /tmp/w/tensorflow_text-2.12.1-*.whl \
        > multimodal_tf/serving_ops/tensorflow_text-2.12.1.txt
"""

from __future__ import annotations

import re
import sys
import zipfile


def wheel_strings(path: str) -> set[bytes]:
    """Every printable NUL-terminated string (>= 3 chars) in the wheel's op libraries."""
    found: set[bytes] = set()
    with zipfile.ZipFile(path) as wheel:
        for name in wheel.namelist():
            if re.search(r"/python/.*/_[^/]+\.so$", name):
                found |= set(re.findall(rb"([\x20-\x7e]{3,})\x00", wheel.read(name)))
    return found


def main(argv: list[str]) -> int:
    from multimodal_tf.export import installed_text_ops  # noqa: PLC0415  (imports TF)

    strings = wheel_strings(argv[1])
    print(f"# tensorflow-text ops found in {argv[1].rsplit('/', 1)[-1]} (tools/text_ops_from_wheel.py)")
    for op in sorted(installed_text_ops()):
        if op.encode() in strings:
            print(op)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
