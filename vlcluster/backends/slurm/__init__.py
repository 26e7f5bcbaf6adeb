"""The SLURM backend: ``backend.py`` queues the pipeline through submitit,
``stage.py`` is what runs inside each job's allocation, ``jobs.py`` reads
what SLURM says about the run's jobs (sacct) and cancels them."""
