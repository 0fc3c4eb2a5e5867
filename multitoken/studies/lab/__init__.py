"""The lab: how language models learn, measured on models trained here or brought with --checkpoint."""
