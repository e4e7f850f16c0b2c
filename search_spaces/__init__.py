"""Declarative search spaces shipped with ranksearch (YAML files beside this module)."""
