"""``python -m multimodal_tf.cli``: the same as the ``mmtf`` console script."""

import sys

from multimodal_tf.cli import main

sys.exit(main())
