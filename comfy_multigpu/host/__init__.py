"""Everything that touches ComfyUI: the patch installer (patching.py) and the replacements patches/manifest.toml names."""
