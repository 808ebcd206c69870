"""iMuon (intrinsic Muon): spectral steepest descent on Riemannian matrix manifolds.

The core (:mod:`imuon_manopt.lmo`, :mod:`imuon_manopt.geometry`, :mod:`imuon_manopt.direction`) is written once in
PyTorch and imports neither host library. Adapters mirror their host's names:

- :class:`imuon_manopt.optimizers.IMuon`: a Pymanopt solver for ``pymanopt.Problem``;
- :class:`imuon_manopt.optim.IMuon`: a ``torch.optim`` optimizer for geoopt ``ManifoldParameter``s.

Reference: Li et al., "Intrinsic Muon: Spectral Optimization on Riemannian Matrix Manifolds", arXiv:2605.09238.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
