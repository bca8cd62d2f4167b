"""python -m lightning_attention demo (not written yet)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    print("demo: not implemented yet")
    return 1
