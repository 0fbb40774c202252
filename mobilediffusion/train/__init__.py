"""Training support: the synthetic captioned scenes (`data`) and their model-free evaluator (`evaluate`).

Importing this package loads nothing; import the submodules (numpy + PIL only, no torch).
"""
