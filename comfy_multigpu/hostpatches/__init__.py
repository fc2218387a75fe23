"""Replacements for ComfyUI objects, one module per concern; each `make_*(original, pool)` builds one.

Which object each replaces, why, and the host shape it requires is declared in
patches/manifest.toml; comfy_multigpu.patching applies and reverts them. Nothing here runs at import.
"""
