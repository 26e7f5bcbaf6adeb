"""Stage outputs: the result record and the done-marker."""

from vlcluster.model.files import (  # noqa: F401 - moved to the model library; the next commit updates importers
    file_sha256, finish_stage, read_model, read_model_config, read_result, weights_sha256, write_model, write_model_record,
)
