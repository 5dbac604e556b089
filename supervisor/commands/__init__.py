"""The command lines: hermes-gateway, hermes-ps, install-service."""
