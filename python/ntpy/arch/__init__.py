"""nt.arch/v1 specs from and to PyTorch modules.

* `arch_from_module(module, example_input, name=None) -> dict`: the spec of
  a module, traced with torch.fx; its parameter names are the module's
  state_dict keys.
* `module_from_arch(spec) -> nn.Module`: a plain PyTorch module for a spec
  (a dict, JSON text, a JSON file or a checkpoint), whose `load_state_dict`
  takes nt's checkpoints as they are.
* `verify(module, spec, example_input)`: the spec's module, with the
  module's weights, computes what the module does.

`python -m ntpy.arch --help` for the command line.
"""

from .build import ArchModule, Group, module_from_arch
from .errors import ArchError, SpecError, UnsupportedModule
from .spec import FORMAT, load_spec, resolve
from .trace import arch_from_module, verify

__all__ = [
    "FORMAT",
    "ArchError",
    "ArchModule",
    "Group",
    "SpecError",
    "UnsupportedModule",
    "arch_from_module",
    "load_spec",
    "module_from_arch",
    "resolve",
    "verify",
]
