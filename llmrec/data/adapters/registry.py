"""The dataset adapters `llmrec prepare` knows, by their `NAME`: the one list of adapter modules.

Adding a dataset = writing `llmrec/data/adapters/<module>.py` (with `NAME` and `load`, see
`llmrec.data.adapters`) and adding the module to `ADAPTER_MODULES` below; `DATASETS` (the `--dataset`
choices, in this order) and the lookup by name follow from it. docs/howto.md walks through one.
Tests: tests/test_prepare.py (`test_registry_names`).
"""

from __future__ import annotations

from types import ModuleType

from llmrec.data.adapters import (
    amazon_beauty,
    amazon_instruments,
    amazon_magazine,
    amazon_scientific,
    generic,
    mind,
    movielens,
)

__all__ = ["ADAPTERS", "ADAPTER_MODULES", "DATASETS", "get_adapter"]

# the order is the order of `llmrec prepare --dataset` choices and of error messages
ADAPTER_MODULES: tuple[ModuleType, ...] = (
    movielens,
    amazon_magazine,
    amazon_scientific,
    mind,
    amazon_beauty,
    amazon_instruments,
    generic,
)


def _by_name(modules: tuple[ModuleType, ...]) -> dict[str, ModuleType]:
    """{module.NAME: module}; a module without a str NAME, or two with one NAME, is a programming error."""
    out: dict[str, ModuleType] = {}
    for m in modules:
        name = getattr(m, "NAME", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter module {m.__name__} must define NAME: str (the --dataset name)")
        if name in out:
            raise ValueError(f"adapter NAME {name!r} is defined by both {out[name].__name__} and "
                             f"{m.__name__}; give each adapter its own NAME")
        out[name] = m
    return out


ADAPTERS: dict[str, ModuleType] = _by_name(ADAPTER_MODULES)  # NAME -> adapter module
DATASETS: tuple[str, ...] = tuple(ADAPTERS)  # the --dataset names, in ADAPTER_MODULES order


def get_adapter(dataset: str) -> ModuleType:
    """The adapter module whose NAME is `dataset`; ValueError listing the known names otherwise."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(ADAPTERS)}")
    return ADAPTERS[dataset]
