"""The record configs (YAML), installed as package data under ``pgolf_lit.configs`` so that ``pgolf fit --config
pr1394_sp8192_loop45`` and ``pgolf demo`` work from a wheel, away from the repository."""
