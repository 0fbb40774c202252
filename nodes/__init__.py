"""ComfyUI node classes, one file per stage; registered in the plugin's top-level __init__.py."""
