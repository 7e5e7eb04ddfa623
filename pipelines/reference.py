"""``python -m pipelines.reference``: print docs/parameters.md (generated from the declarations)."""

from ._reference import parameters_markdown

if __name__ == "__main__":
    print(parameters_markdown(), end="")
