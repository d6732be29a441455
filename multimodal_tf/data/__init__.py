"""Data layer: manifests, TFRecords, in-graph preprocessing and tf.data pipelines."""
