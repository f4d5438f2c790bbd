"""Serving: LISA behind HTTP (jaxlisa.serving.server), above jaxlisa.inference (which decodes)."""
