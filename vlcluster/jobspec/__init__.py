"""Job specs: pydantic models and YAML loading."""
