"""The ridge solver's fast path: hand-tuned LAPACK behind one function, :func:`ridge_paths`.

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
* **Folds in parallel threads**: ``dsytrd`` reached through
  ``scipy.linalg.cython_lapack``'s exported pointer via ctypes releases the GIL
  (scipy's f2py wrapper does not).
* **OpenBLAS held to one thread** while we call it: its spinning threads took the
  cores from torch's thread pool (3x slower torch operations on 2 cores).
* **A few alphas** (the final refit) take one Cholesky factorisation each instead.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["ridge_paths"]


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
        if len(alphas) <= 4:  # a few alphas (the final refit): Cholesky per alpha is cheaper
            return [_ridge_solve(C, B, alphas) for C, B in systems]
        # the systems' tridiagonalisations are independent and release the GIL: one thread each
        workers = min(len(systems), os.cpu_count() or 1)
        if workers > 1 and systems[0][0].shape[0] > 1:
            with ThreadPoolExecutor(workers) as pool:
                tridiagonals = list(pool.map(lambda s: _tridiagonalise(s[0].numpy()), systems))
        else:
            tridiagonals = [None] * len(systems)
        return [_ridge_path(C, B, alphas, tri) for (C, B), tri in zip(systems, tridiagonals)]


def _ridge_path(C: torch.Tensor, B: torch.Tensor, alphas, tridiagonal=None) -> torch.Tensor:
    """Solve ``(C + alpha I) W = B`` for every alpha: ``(D, A, T)`` float64 on the CPU.

    ``C`` (D, D) symmetric positive semi-definite, ``B`` (D, T). One Householder
    tridiagonalisation ``C = Q Tri Q^T`` (LAPACK ``dsytrd``) serves every alpha,
    each then costing a tridiagonal solve (``dgtsv``, partial pivoting) instead of a
    factorisation. That is about half the work of the eigendecomposition it
    replaces (no eigenvectors), and as stable: ``Q`` is orthogonal, and the solve
    pivots. ``C`` is overwritten; ``tridiagonal`` is :func:`_tridiagonalise`'s
    output for ``C`` when the caller already has it.
    """
    from scipy.linalg import lapack

    D, T = B.shape
    a = np.asarray(alphas, dtype=np.float64)
    A = a.size
    if D == 1:
        return (B / (C + torch.as_tensor(a)[:, None])).reshape(1, A, T)
    packed, diag, off, tau = tridiagonal if tridiagonal is not None else _tridiagonalise(C.numpy())
    reflectors = torch.from_numpy(packed)[1:, :-1]  # Q = H(1)...H(D-1), acting on rows 1..D-1
    tau = torch.from_numpy(tau)
    QtB = B.clone()
    QtB[1:] = torch.ormqr(reflectors, tau, B[1:], left=True, transpose=True)
    # all alphas as one block-diagonal tridiagonal system: couplings between blocks are 0
    sub = np.zeros((A, D))
    sub[:, :-1] = off
    sub = sub.reshape(-1)[:-1]
    rhs = np.tile(QtB.numpy(), (A, 1))
    *_, Y, info = lapack.dgtsv(sub, (diag[None, :] + a[:, None]).reshape(-1), sub.copy(), rhs,
                                overwrite_b=1)
    if info != 0:  # a shifted system singular in rounding (C + alpha I ~ 0 somewhere): clip and solve
        Y = _tridiagonal_path_eigen(diag, off, QtB.numpy(), a)
    W = torch.from_numpy(Y).reshape(A, D, T).permute(1, 0, 2).reshape(D, A * T).contiguous()
    W[1:] = torch.ormqr(reflectors, tau, W[1:], left=True, transpose=False)
    return W.reshape(D, A, T)


@functools.lru_cache(maxsize=None)
def _lapack_dsytrd():
    """scipy's ``dsytrd`` as a ctypes function, which releases the GIL while it runs (None if unavailable).

    The f2py wrapper in ``scipy.linalg.lapack`` holds the GIL, so threads cannot
    tridiagonalise several folds at once; the same LAPACK routine reached through
    ``scipy.linalg.cython_lapack``'s exported pointer (as numba does) can.
    """
    import ctypes

    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dsytrd"]
        get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
    except Exception:  # another scipy layout: the f2py wrapper still works, one fold at a time
        return None
    i, d = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, i, d, i, d, d, d, d, i, i)(address)


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


def _tridiagonal_path_eigen(diag, off, B, alphas) -> np.ndarray:
    """``(Tri + alpha I)^{-1} B`` for every alpha through the eigenvectors of ``Tri``, eigenvalues clipped at 0.

    The fallback of :func:`_ridge_path`; returns (A * D, T) in the same layout as its solve.
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


