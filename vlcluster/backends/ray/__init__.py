"""The Ray backend: ``backend.py`` drives the pipeline as Ray jobs (Jobs
API), ``stage.py`` is what runs inside each job, ``multi_node.py`` spreads a
stage over several Ray nodes from there, ``jobs.py`` reads what Ray says
about the run's jobs and stops them, ``local_cluster.py`` starts a private
one-node cluster."""
