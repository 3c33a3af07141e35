"""CLI subcommands for anatomy: inspect, hash, export, import, compare (see anatomy.py)."""


def add_parsers(sub) -> None:
    pass
