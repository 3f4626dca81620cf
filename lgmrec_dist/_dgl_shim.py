"""Make ``import dgl`` work with torch newer than the builds dgl 2.1.0 ships.

dgl 2.1.0 always imports ``dgl.graphbolt``, whose native library exists only for torch <= 2.2.1. Its
core (graphs, sampling, to_block, METIS partitioning) works with newer torch. When the matching
``libgraphbolt_pytorch_<torch version>.so`` is missing, this finder answers ``dgl.graphbolt`` with an
empty placeholder module. ``launch/setup.sh`` installs it through a ``.pth`` file so that every process
(Ray workers, DataLoader workers, torchrun children) has it before anything imports dgl. Graphbolt and
dgl.sparse stay unavailable; the project never uses them.
"""
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

os.environ.setdefault("DGLBACKEND", "pytorch")


def _graphbolt_library_missing() -> bool:
    try:
        torch_version = importlib.metadata.version("torch").split("+")[0]
        dgl_spec = importlib.util.find_spec("dgl")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    if dgl_spec is None or not dgl_spec.submodule_search_locations:
        return False
    lib = os.path.join(list(dgl_spec.submodule_search_locations)[0], "graphbolt",
                       f"libgraphbolt_pytorch_{torch_version}.so")
    return not os.path.exists(lib)


class _GraphboltPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    _missing = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "dgl.graphbolt":
            return None
        if self._missing is None:
            type(self)._missing = _graphbolt_library_missing()
        if not self._missing:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name, "placeholder: graphbolt has no build for this torch")
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _GraphboltPlaceholder) for f in sys.meta_path):
        sys.meta_path.insert(0, _GraphboltPlaceholder())


install()
