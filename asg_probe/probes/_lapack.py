"""The ridge solver's fast path: hand-tuned LAPACK behind :class:`Tridiagonal` and :func:`ridge_paths`.

Everything here answers one question: for symmetric positive semi-definite
``C`` (D, D) and right-hand sides ``B`` (D, T), what is ``(C + alpha I)^{-1} B``
for every alpha of a grid, for several ``(C, B)`` systems at once (one per
cross-validation fold)? :func:`asg_probe.probes.solver.solve_ridge_cv` asks it
(``method="fast"``); ``method="eigh"`` answers the same question with a plain
``scipy.linalg.eigh`` instead, and the tests hold the two to each other.

How it is fast, and why each trick is safe:

* **One tridiagonalisation per system** (LAPACK ``dsytrd``), ``C = Q Tri Q^T``,
  serves every alpha; each alpha then costs a tridiagonal solve (``dgtsv``,
  partial pivoting). About half the work of an eigendecomposition (no
  eigenvectors) and as stable: ``Q`` is orthogonal and the solve pivots.
* **Folds in parallel threads**: ``dsytrd``, ``dormtr`` (applying ``Q``) and
  ``dgtsv`` reached through ``scipy.linalg.cython_lapack``'s exported pointers via
  ctypes release the GIL (scipy's f2py wrappers do not), so a fold's whole path
  (:class:`Tridiagonal`) runs in a worker thread.
* **No copies around ``Q``**: the right-hand sides, the tridiagonal solutions and
  the back-transformed weights stay in Fortran order, the layout LAPACK works in.
* **OpenBLAS held to one thread** while we call it: its spinning threads took the
  cores from torch's thread pool (3x slower torch operations on 2 cores).
* **A few alphas** take one Cholesky factorisation each instead (:func:`ridge_paths`); the
  solver's refit at the chosen alphas uses :meth:`Tridiagonal.solve` on a tridiagonalisation
  made while the folds run.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["ridge_paths", "Tridiagonal", "solver_threads"]


def ridge_paths(systems, alphas) -> list:
    """``(C + alpha I)^{-1} B`` for every alpha and every ``(C, B)`` of ``systems``.

    Parameters
    ----------
    systems : list of (C, B)
        ``C`` (D, D) float64 symmetric PSD CPU tensor (overwritten), ``B`` (D, T) float64.
    alphas : sequence of float
        Positive penalties.

    Returns
    -------
    list of tensor (D, A, T)
        One per system, float64 on the CPU.

    Examples
    --------
    >>> C, B = torch.eye(3, dtype=torch.float64) * 2, torch.ones(3, 1, dtype=torch.float64)
    >>> [round(w, 12) for w in ridge_paths([(C, B)], [1.0, 2.0])[0][0, :, 0].tolist()]
    [0.333333333333, 0.25]
    """
    with _single_threaded_blas():
        if len(alphas) <= 4:  # a few alphas: Cholesky per alpha is cheaper
            return [_ridge_solve(C, B, alphas) for C, B in systems]
        # the systems are independent and their LAPACK calls release the GIL: one thread each
        workers = solver_threads(len(systems))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(lambda s: _ridge_path(*s, alphas), systems))
        return [_ridge_path(C, B, alphas) for C, B in systems]


def _ridge_path(C: torch.Tensor, B: torch.Tensor, alphas) -> torch.Tensor:
    """Solve ``(C + alpha I) W = B`` for every alpha: ``(D, A, T)`` float64 on the CPU (:meth:`Tridiagonal.path`).

    ``C`` (D, D) symmetric positive semi-definite (overwritten), ``B`` (D, T). One Householder
    tridiagonalisation ``C = Q Tri Q^T`` (LAPACK ``dsytrd``) serves every alpha, each then
    costing a tridiagonal solve (``dgtsv``, partial pivoting) instead of a factorisation.
    That is about half the work of an eigendecomposition (no eigenvectors), and as stable:
    ``Q`` is orthogonal, and the solve pivots.
    """
    W = Tridiagonal(C.numpy()).path(B.numpy(), alphas)               # (T, A, D)
    return torch.from_numpy(W).permute(2, 1, 0)


#: ctypes argument types of the LAPACK routines called without the GIL: c = char*, i = int*, d = double*.
_SIGNATURES = {"dsytrd": "cididdddii", "dormtr": "ccciididdidii", "dgtsv": "iiddddii"}


@functools.lru_cache(maxsize=None)
def _lapack_function(name: str):
    """scipy's LAPACK routine ``name`` as a ctypes function, which releases the GIL while it runs (None if unavailable).

    The f2py wrappers in ``scipy.linalg.lapack`` hold the GIL, so threads cannot run them
    at once; the same routines reached through ``scipy.linalg.cython_lapack``'s exported
    pointers (as numba does) can.
    """
    import ctypes

    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
    except Exception:  # another scipy layout: the f2py wrappers and torch still work, one fold at a time
        return None
    kinds = {"c": ctypes.c_char_p, "i": ctypes.POINTER(ctypes.c_int), "d": ctypes.POINTER(ctypes.c_double)}
    return ctypes.CFUNCTYPE(None, *(kinds[k] for k in _SIGNATURES[name]))(address)


def _lapack_dsytrd():
    """``dsytrd`` without the GIL (:func:`_lapack_function`), or None."""
    return _lapack_function("dsytrd")


def _int(value):
    import ctypes

    return ctypes.byref(ctypes.c_int(int(value)))


def _ptr(array: np.ndarray):
    import ctypes

    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_double))


def _tridiagonalise(C: np.ndarray):
    """``dsytrd`` (lower) of a symmetric float64 matrix, overwritten: ``(packed, diag, off, tau)``."""
    import ctypes

    from scipy.linalg import lapack

    dsytrd = _lapack_dsytrd()
    A = C.T  # symmetric: the C-ordered buffer read in Fortran order is the same matrix, no copy
    n = A.shape[0]
    if dsytrd is None or not (A.flags.f_contiguous and A.flags.writeable and A.dtype == np.float64):
        packed, diag, off, tau, info = lapack.dsytrd(A, lower=1, overwrite_a=1)
    else:
        diag, off, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
        work = np.empty(32 * n)  # LAPACK's blocked sytrd wants n * block size
        dim, lwork, info = ctypes.c_int(n), ctypes.c_int(work.size), ctypes.c_int(0)
        ptr = ctypes.POINTER(ctypes.c_double)
        dsytrd(b"L", ctypes.byref(dim), A.ctypes.data_as(ptr), ctypes.byref(dim), diag.ctypes.data_as(ptr),
               off.ctypes.data_as(ptr), tau.ctypes.data_as(ptr), work.ctypes.data_as(ptr),
               ctypes.byref(lwork), ctypes.byref(info))
        packed, info = A, info.value
    if info != 0:
        raise RuntimeError(f"LAPACK dsytrd failed (info={info}) on a {n}x{n} covariance")
    return packed, diag, off, tau


def solver_threads(jobs: int) -> int:
    """Worker threads for ``jobs`` independent LAPACK jobs: no more than torch's thread count (the
    user's choice of how many cores to use) nor the machine's cores."""
    return max(1, min(int(jobs), torch.get_num_threads(), os.cpu_count() or 1))


class Tridiagonal:
    """``C = Q Tri Q^T`` of one symmetric PSD float64 matrix, and the ridge solves it serves.

    Built by :func:`_tridiagonalise` (``C`` is overwritten). Every method works on numpy
    float64 arrays in Fortran order and, where scipy exports its LAPACK pointers, releases
    the GIL, so several folds run in threads: :meth:`path` gives the ridge weights
    ``(C + alpha I)^{-1} B`` of every alpha at once (one tridiagonal solve per alpha, then one
    back-transformation), :meth:`solve` one alpha per column (the refit at the chosen alphas).
    """

    def __init__(self, C: np.ndarray):
        self.d = C.shape[0]
        self.packed, self.diag, self.off, self.tau = _tridiagonalise(C) if self.d > 1 else (C, C[0], None, None)

    def apply_q(self, M: np.ndarray, transpose: bool = False, overwrite: bool = False) -> np.ndarray:
        """``Q M`` (or ``Q^T M``) for ``M`` (D, k), in Fortran order; ``overwrite``: in ``M`` itself where it is
        Fortran-ordered float64 already."""
        M = np.array(M, dtype=np.float64, order="F", copy=None if overwrite else True)
        if self.d == 1 or M.shape[1] == 0:
            return M
        dormtr = _lapack_function("dormtr")
        if dormtr is None or not self.packed.flags.f_contiguous:
            out = torch.from_numpy(M.copy(order="F"))
            out[1:] = torch.ormqr(torch.from_numpy(self.packed)[1:, :-1], torch.from_numpy(self.tau), out[1:].clone(),
                                  left=True, transpose=transpose)
            return np.asfortranarray(out.numpy())
        import ctypes

        m, k = M.shape
        work = np.empty(64 * max(k, 1) + 4160)  # dormqr's blocked size: NW * NB (64 at most) + T's 65 x 64
        info = ctypes.c_int(0)
        dormtr(b"L", b"L", b"T" if transpose else b"N", _int(m), _int(k), _ptr(self.packed), _int(self.d),
               _ptr(self.tau), _ptr(M), _int(m), _ptr(work), _int(work.size), ctypes.byref(info))
        if info.value != 0:
            raise RuntimeError(f"LAPACK dormtr failed (info={info.value})")
        return M

    def _solve_shifted(self, rhs: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """``(Tri + shift_j I) y_j = rhs_j`` for blocks ``j``: ``rhs`` (D, J, r) Fortran-ordered, solved in place.

        All blocks form one block-diagonal tridiagonal system (couplings 0, so each block is
        solved as if alone), solved by one ``dgtsv`` (partial pivoting). Raises
        :class:`_Singular` on a zero pivot (a shifted system singular in rounding).
        """
        D, J, r = rhs.shape
        if D == 1:
            rhs /= (self.diag + shifts)[None, :, None]
            return rhs
        flat = rhs.reshape(D * J, r, order="F")  # a view (rhs is Fortran-ordered): block j is rows j D ..
        assert np.shares_memory(flat, rhs)
        sub = np.zeros((J, D))
        sub[:, :-1] = self.off
        sub = sub.reshape(-1)[:-1].copy()
        diag = (self.diag[None, :] + shifts[:, None]).reshape(-1)
        dgtsv = _lapack_function("dgtsv")
        if dgtsv is not None:
            import ctypes

            info = ctypes.c_int(0)
            dgtsv(_int(D * J), _int(r), _ptr(sub), _ptr(diag), _ptr(sub.copy()), _ptr(flat), _int(D * J),
                  ctypes.byref(info))
            info = info.value
        else:
            from scipy.linalg import lapack

            *_, solved, info = lapack.dgtsv(sub, diag, sub.copy(), flat)
            flat[...] = solved
        if info != 0:
            raise _Singular()
        return rhs

    def path(self, B: np.ndarray, alphas) -> np.ndarray:
        """Ridge weights for every alpha: ``(T, A, D)``, row ``[t, a]`` = ``(C + alpha_a I)^{-1} B[:, t]``."""
        a = np.asarray(alphas, dtype=np.float64)
        D, T = B.shape
        QtB = self.apply_q(B, transpose=True)
        rhs = np.empty((D, a.size, T), order="F")                # block a (one per alpha) holds every column
        rhs[...] = QtB[:, None, :]
        try:
            Y = self._solve_shifted(rhs, a)
        except _Singular:  # a shifted system singular in rounding (C + alpha I ~ 0 somewhere): clip and solve
            Y = np.asfortranarray(_tridiagonal_path_eigen(self.diag, self.off, QtB, a).reshape(a.size, D, T)
                                  .transpose(1, 0, 2))
        W = self.apply_q(Y.reshape(D, a.size * T, order="F"), overwrite=True)   # column a + A t, in C's basis
        return W.T.reshape(T, a.size, D)

    def solve(self, B: np.ndarray, alphas) -> np.ndarray:
        """``(C + alpha_t I)^{-1} B[:, t]``, one alpha per column: ``(D, T)`` (the refit at the chosen alphas)."""
        a = np.asarray(alphas, dtype=np.float64)
        D, T = B.shape
        QtB = self.apply_q(B, transpose=True)
        try:
            Y = self._solve_shifted(QtB.copy(order="F").reshape(D, T, 1, order="F"), a)[:, :, 0]
        except _Singular:
            Y = np.stack([_tridiagonal_path_eigen(self.diag, self.off, QtB[:, [t]], a[[t]])[:, 0]
                          for t in range(T)], 1)
        return self.apply_q(Y, overwrite=True)


class _Singular(Exception):
    """A shifted tridiagonal system had an exactly zero pivot (see :meth:`Tridiagonal._solve_shifted`)."""


def _tridiagonal_path_eigen(diag, off, B, alphas) -> np.ndarray:
    """``(Tri + alpha I)^{-1} B`` for every alpha through the eigenvectors of ``Tri``, eigenvalues clipped at 0.

    The fallback of :meth:`Tridiagonal.path` and :meth:`Tridiagonal.solve` for a zero pivot; returns (A * D, T).
    """
    from scipy.linalg import eigh_tridiagonal

    lam, U = eigh_tridiagonal(diag, off)
    lam = np.clip(lam, 0, None)  # a covariance is PSD: negative eigenvalues are rounding
    P = U.T @ B
    return (U @ (P[None] / (lam[None, :, None] + alphas[:, None, None]))).reshape(-1, B.shape[1])


@functools.lru_cache(maxsize=None)
def _blas_controller():
    import scipy.linalg.lapack  # noqa: F401  (load scipy's OpenBLAS before looking for it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _single_threaded_blas():
    """Keep numpy/scipy's OpenBLAS on one thread while we call it.

    ``dsytrd`` gains nothing from a second thread at these sizes, and OpenBLAS
    threads left spinning after a call take the cores from torch's own thread
    pool: on 2 cores that tripled the time of the torch operations around it.
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def _ridge_solve(C: torch.Tensor, B: torch.Tensor, alphas) -> torch.Tensor:
    """:func:`_ridge_path` for a few alphas: one Cholesky factorisation each (cheaper than tridiagonalising)."""
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64))
    shifted = C[None] + a[:, None, None] * torch.eye(C.shape[0], dtype=C.dtype)
    L, info = torch.linalg.cholesky_ex(shifted)
    if bool(info.any()):  # not positive definite in rounding: the pivoting path copes
        return _ridge_path(C, B, alphas)
    return torch.cholesky_solve(B.expand(len(a), *B.shape), L).permute(1, 0, 2)


