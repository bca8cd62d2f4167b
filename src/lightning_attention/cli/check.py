"""python -m lightning_attention check (not written yet)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    print("check: not implemented yet")
    return 1
