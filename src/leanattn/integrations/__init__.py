"""Integrations with model libraries; each module is imported on its own (``import
leanattn.integrations.transformers``) so that leanattn itself needs none of them."""
