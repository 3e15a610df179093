"""Weights in, torch modules out: ldm single files and diffusers folders, the built-in presets,
LoRA, the converted-weights cache, the networks' torch modules and the CLIP tokenizer.

Inner layers (bottom to top; tests/test_imports.py checks them): `weights` → `tokenizer`,
`components` → `weights_cache`, `networks` → `single_file` → `ldm_layout`, `presets` → `lora`.
Import from the modules themselves; this file re-exports nothing, so importing one module does
not load the others.
"""
