"""pytest plugin: every diagonal Laplace that laplace-torch's own tests build with a GGN backend (CurvlinopsGGN,
AsdlGGN, BackPackGGN, or the default) fits with torch_secorder's SecorderGGN instead, same backend_kwargs
(stochastic=True: our Monte-Carlo Fisher). Empirical-Fisher and Hessian backends are left as they are.
Counts the substituted fits and the diag() calls that served them, and prints them at the end."""

import pytest
from laplace.baselaplace import DiagLaplace
from laplace.curvature import GGNInterface

from torch_secorder.integrations.laplace import SecorderGGN

COUNTS = dict(laplaces=0, diag_calls=0)
_original_init = DiagLaplace.__init__
_original_diag = SecorderGGN.diag


def _substituting_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    backend = self._backend_cls
    if issubclass(backend, GGNInterface) and not issubclass(backend, SecorderGGN):
        self._backend_cls = SecorderGGN
        COUNTS["laplaces"] += 1


def _counting_diag(self, *args, **kwargs):
    COUNTS["diag_calls"] += 1
    return _original_diag(self, *args, **kwargs)


def pytest_configure(config):
    DiagLaplace.__init__ = _substituting_init
    SecorderGGN.diag = _counting_diag


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"secorder_substitute: {COUNTS['laplaces']} diagonal Laplaces got SecorderGGN, "
        f"{COUNTS['diag_calls']} diag() calls served by it"
    )
