"""tapeline's engine: what every stage relies on and no stage is (config, results, errors, the content-addressed
cache and its stores, code hashing, the registry, the cluster, the hardware, the user's model reference, the
serving layout, predict). Nothing in here imports `stages` or Prefect."""
