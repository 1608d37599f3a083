"""Deploying mops-fl for real: certificates and keys, SuperLink and SuperNodes, Docker files in docker/."""
