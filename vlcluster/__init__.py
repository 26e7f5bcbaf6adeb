"""vlcluster: multimodal model-merging research pipelines on local machines and clusters."""
