"""Python config files (ml_collections). ``common.base_config()`` holds every field."""
