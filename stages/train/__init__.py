"""The train stage: the tape step (`step`), the loop (`loop`), where it runs (`environment`), checkpoints, early
stopping, warm start, outputs and the stage itself (`stage`); `worker` is a training worker process's entry."""
