"""Triton kernels of fastsae, installed as fastsae.kernels (one file per kernel family).

Python run from a checkout's root finds this folder first under the top-level name `kernels`,
the name of a PyPI package that transformers imports. Imported under that name, this file
hands over to the installed package (load_pypi_kernels), so `import transformers` works there.
"""


def load_pypi_kernels():
    """The PyPI package `kernels`, loaded from its installed files into sys.modules["kernels"]
    (None where it is not installed): the one way fastsae reaches it, whatever sys.path holds."""
    import importlib.metadata
    import importlib.util
    import pathlib
    import sys

    try:
        init = pathlib.Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return None
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("kernels")
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if previous is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = previous
        raise
    return module


if __name__ == "kernels":  # imported from a checkout's root in place of the PyPI package
    load_pypi_kernels()  # the import statement returns sys.modules["kernels"]: that package, if installed
