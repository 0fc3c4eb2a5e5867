"""The lab: small, checkable reproductions of the science of how language models learn (e.g. scaling laws)."""
