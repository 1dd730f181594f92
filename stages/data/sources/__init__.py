"""Data sources: IDX files, tf.keras.datasets, TFDS, Parquet and image folders; `resolve` maps `data.source`."""
