"""Orchestration over the method registry: the end-to-end demo (`demo`, its report) and cross-validation (`cv`)."""
