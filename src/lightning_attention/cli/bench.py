"""python -m lightning_attention bench (not written yet)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    print("bench: not implemented yet")
    return 1
