"""CLI subcommands for recipes: merge, demo (see recipe.py)."""


def add_parsers(sub) -> None:
    pass
