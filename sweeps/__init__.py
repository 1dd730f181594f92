"""Hyperparameter sweeps over the stage graph: the search space, the Optuna sampler and pruner driven by ask and
tell, the sweep's state in the artifacts store, one trial per process, and the driver. No Prefect import here."""
