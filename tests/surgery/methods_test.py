"""Every surgery method against an independent numpy implementation.

The references below work on explicit flattened gradient vectors in float64
(the way the papers / LibMTL state the algorithms), never on the library's
Gram-matrix formulation, and call nothing from ``slamjax``. Inputs are random
gradient sets for T in {2, 3, 5} over a two-leaf tree (17 parameters, so the
gradients are linearly independent and every solution is unique).

Tolerance: outputs must agree to 1e-5 relative to the largest task-gradient
norm (``_assert_close``). The library runs in float32 with exact (finite)
solvers, so its error is float32 round-off (~1e-6); the references for the
iterative methods are solved to ~1e-10 in float64 (brute-force enumeration
of active sets for MGDA and UPGrad, SLSQP with ftol=1e-15 for CAGrad, a
Newton root for Nash-MTL).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from slamjax import surgery

TS = (2, 3, 5)
SEEDS = (0, 1, 2)
SHAPES = {"a": (4, 3), "b": (5,)}
TOL = 1e-5


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _random_tree(t, seed, conflict=True):
  rng = np.random.default_rng(seed)
  tree = {k: rng.normal(size=(t, *s)).astype(np.float32)
          for k, s in SHAPES.items()}
  if conflict:  # make sure some pairs conflict strongly
    tree["a"][-1] -= 1.5 * tree["a"][0]
    tree["b"][-1] -= 1.5 * tree["b"][0]
  return tree


def _flat(tree):
  """(T, P) float64 matrix J, rows = flattened task gradients."""
  t = tree["a"].shape[0]
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(t, -1)
                         for k in sorted(SHAPES)], axis=1)


def _flat_out(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1)
                         for k in sorted(SHAPES)])


def _assert_close(out, ref, j, tol=TOL):
  scale = max(1.0, float(np.max(np.linalg.norm(j, axis=1))))
  err = float(np.max(np.abs(np.asarray(out, np.float64) - ref)))
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol * scale:.3g}"


_RANDOM = ("pcgrad", "ags", "gradvac")


@functools.lru_cache(maxsize=None)
def _jitted(name, **kwargs):
  """(tx, jitted update) built once per method config (compile reuse)."""
  tx = surgery.get(name, **kwargs)
  return tx, jax.jit(tx.update)


def _run(name, tree, *, key=None, steps=1, task_weights=None, **kwargs):
  """Applies method ``name`` to ``tree``; returns (flat output, state).

  The PRNG key only enters the state, so it is set there: one compilation
  per (method, T, kwargs) serves every key. ``task_weights`` is always
  passed (ones by default) for the same reason.
  """
  t = tree["a"].shape[0]
  tx, update = _jitted(name, num_tasks=t, **kwargs)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  if name in _RANDOM:
    state = state._replace(key=jax.random.PRNGKey(0 if key is None else key))
  if task_weights is None:
    task_weights = np.ones(t, np.float32)
  for _ in range(steps):
    out, state = update(tree, state, params, task_weights=task_weights)
  return _flat_out(out), state


@functools.lru_cache(maxsize=None)
def _orders_fn(t):
  return jax.jit(lambda key: surgery.task_orders(key, t))


def _step_orders(key, t):
  """Orders the transform uses at its first update (documented convention:
  the state key is split into (next_key, step_key) on every update)."""
  _, step_key = jax.random.split(jax.random.PRNGKey(key))
  return np.asarray(_orders_fn(t)(step_key))


# ----------------------------------------------------------------------------
# numpy references (float64, parameter space).
# ----------------------------------------------------------------------------


def ref_pcgrad(j, orders):
  """Yu et al. 2020, Alg. 1: project onto normal planes of original g_j."""
  out = np.zeros(j.shape[1])
  for i in range(len(j)):
    g = j[i].copy()
    for k in orders[i]:
      d = g @ j[k]
      if d < 0:
        g = g - d / (j[k] @ j[k]) * j[k]
    out += g
  return out


def ref_gradvac(j, orders, groups, rho_t, beta):
  """Wang et al. 2021 / LibMTL GradVac; groups = list of column slices."""
  rho_t = rho_t.copy()
  pc = j.copy()
  for i in range(len(j)):
    for k in orders[i]:
      for gi, sl in enumerate(groups):
        a, b = pc[i, sl], j[k, sl]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        rho = a @ b / (na * nb)
        phi = rho_t[gi, i, k]
        if rho < phi:
          w = na * (phi * np.sqrt(1 - rho**2) - rho * np.sqrt(1 - phi**2)) / (
              nb * np.sqrt(1 - phi**2))
          pc[i, sl] = a + w * b
        rho_t[gi, i, k] = (1 - beta) * phi + beta * rho
  return pc.sum(0), rho_t


def ref_mgda(j):
  """Min-norm point of conv{g_t}: enumerate supports, exact KKT in float64."""
  t = len(j)
  g = j @ j.T
  best, best_w = np.inf, None
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      k = np.zeros((r + 1, r + 1))
      k[:r, :r], k[:r, r], k[r, :r] = g[np.ix_(s, s)], 1, 1
      sol = np.linalg.lstsq(k, np.r_[np.zeros(r), 1.0], rcond=None)[0]
      if np.all(sol[:r] >= -1e-12):
        w = np.zeros(t)
        w[s] = sol[:r]
        val = w @ g @ w
        if val < best - 1e-15:
          best, best_w = val, w
  return best_w @ j


def ref_upgrad(j, pref=None, reg_eps=1e-6):
  """Quinton & Rey 2024: mean of projections of pref_i g_i on the dual cone.

  By the paper's Prop. 1 the projection of J^T u onto {x: Jx >= 0} is J^T v,
  v = argmin_{v >= u} v^T G v. Solved here by enumerating which bounds are
  active (exact KKT, float64), with the library's ridge: reg_eps times each
  task's own squared norm (torchjd's is relative to the trace).
  """
  t = len(j)
  g = j @ j.T
  q = g + reg_eps * np.diag(np.diag(g))
  pref = np.full(t, 1.0 / t) if pref is None else np.asarray(pref, float)
  total = np.zeros(t)
  for i in range(t):
    u = np.zeros(t)
    u[i] = pref[i]
    found = None
    for r in range(t + 1):
      for free in itertools.combinations(range(t), r):
        free = list(free)
        act = [k for k in range(t) if k not in free]
        v = u.copy()
        if free:
          v[free] = np.linalg.solve(q[np.ix_(free, free)],
                                    -q[np.ix_(free, act)] @ u[act])
        grad = q @ v
        if np.all(v[free] >= u[free] - 1e-12) and np.all(grad[act] >= -1e-12):
          found = v
          break
      if found is not None:
        break
    total += found
  return total @ j


def ref_cagrad(j, c=0.5, rescale=1):
  """Liu et al. 2021 / LibMTL CAGrad with scipy SLSQP (tight tolerance)."""
  t = len(j)
  gg = j @ j.T
  g0_norm = np.sqrt(gg.mean())
  b = np.ones(t) / t
  cc = c * g0_norm

  def obj(x):
    return x @ gg @ b + cc * np.sqrt(x @ gg @ x)

  def jac(x):
    return gg @ b + cc * (gg @ x) / np.sqrt(x @ gg @ x)

  best = None
  for x0 in [np.ones(t) / t] + list(np.eye(t) * 0.9 + 0.1 / t):
    res = scipy.optimize.minimize(
        obj, x0, jac=jac, bounds=[(0, 1)] * t, method="SLSQP",
        constraints=({"type": "eq", "fun": lambda x: 1 - x.sum(),
                      "jac": lambda x: -np.ones(t)},),
        options={"ftol": 1e-15, "maxiter": 1000})
    if best is None or res.fun < best.fun:
      best = res
  gw = best.x @ j
  g = j.mean(0) + cc / np.linalg.norm(gw) * gw
  return g / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]


def ref_imtl_g_weights(j):
  """Liu et al. 2021 (IMTL-G) closed form: a_{2:T} = g_1 U^T (D U^T)^-1."""
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  d = j[:1] - j[1:]
  uu = u[:1] - u[1:]
  a = j[0] @ uu.T @ np.linalg.inv(d @ uu.T)
  return np.r_[1 - a.sum(), a]


def ref_imtl_g(j):
  return ref_imtl_g_weights(j) @ j


def ref_aligned_mtl(j, pref=None):
  """Senushkin et al. 2023: SVD J^T = U S V^T, out = s_min U V^T pref."""
  t = len(j)
  pref = np.ones(t) if pref is None else np.asarray(pref, float)
  u, s, vt = np.linalg.svd(j.T, full_matrices=False)
  return s.min() * u @ vt @ pref


def ref_nash_mtl(j):
  """Navon et al. 2022 (official normalisation): alpha > 0, G alpha = 1/alpha.

  The official code solves with G / ||G||_F but its constraint multiplies the
  factor back in, so the solution is that of the raw G (solved here in the
  normalised form for conditioning, then mapped back).
  """
  g = j @ j.T
  fro = np.linalg.norm(g)
  gn = g / fro
  sol = scipy.optimize.root(lambda a: gn @ a - 1 / a,
                            1 / np.sqrt(np.diag(gn)), tol=1e-13)
  assert np.all(sol.x > 0)
  assert np.max(np.abs(gn @ sol.x - 1 / sol.x)) < 1e-10
  return sol.x / np.sqrt(fro) @ j


# ----------------------------------------------------------------------------
# Comparisons.
# ----------------------------------------------------------------------------

# name -> (kwargs, reference(J) or None if it needs orders)
DETERMINISTIC = {
    "sum": ({}, lambda j: j.sum(0)),
    "mean": ({}, lambda j: j.mean(0)),
    "mgda": ({}, ref_mgda),
    "upgrad": ({}, ref_upgrad),
    "cagrad": ({}, ref_cagrad),
    "imtl_g": ({}, ref_imtl_g),
    "aligned_mtl": ({}, ref_aligned_mtl),
    "nash_mtl": ({}, ref_nash_mtl),
}


def _check_weights(state, tree, out):
  """state.weights are exact: out = sum_t w_t g_t."""
  j = _flat(tree)
  _assert_close(out, np.asarray(state.weights, np.float64) @ j, j)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_match_reference(name, t):
  kwargs, ref = DETERMINISTIC[name]
  for seed in SEEDS:
    tree = _random_tree(t, seed)
    j = _flat(tree)
    out, state = _run(name, tree, **kwargs)
    _assert_close(out, ref(j), j)
    _check_weights(state, tree, out)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("name", ["pcgrad", "ags"])
def test_pcgrad_matches_reference(name, t):
  for seed in SEEDS:
    tree = _random_tree(t, seed)
    j = _flat(tree)
    out, state = _run(name, tree, key=seed)
    ref = ref_pcgrad(j, _step_orders(seed, t))
    if name == "ags":
      ref = ref * np.linalg.norm(j.sum(0)) / np.linalg.norm(ref)
    _assert_close(out, ref, j)
    _check_weights(state, tree, out)


def test_pcgrad_fixed_order_matches_reference():
  tree = _random_tree(3, 7)
  j = _flat(tree)
  out, _ = _run("pcgrad", tree, shuffle=False)
  orders = [[k for k in range(3) if k != i] for i in range(3)]
  _assert_close(out, ref_pcgrad(j, orders), j)


@pytest.mark.parametrize("granularity,ts", [("model", TS), ("leaf", (3,))])
def test_gradvac_matches_reference_over_steps(granularity, ts):
  """Three consecutive steps (EMA targets carried in the optax state)."""
  beta = 0.5
  for t in ts:
    tree0 = _random_tree(t, 10 + t)
    tx, update = _jitted("gradvac", num_tasks=t, beta=beta,
                         granularity=granularity)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = tx.init(params)._replace(key=jax.random.PRNGKey(3))
    update = functools.partial(update, task_weights=np.ones(t, np.float32))
    if granularity == "model":
      groups = [slice(None)]
    else:  # one group per leaf, in tree-flatten order ('a' then 'b')
      groups = [slice(0, 12), slice(12, 17)]
    rho = np.zeros((len(groups), t, t))
    key = jax.random.PRNGKey(3)
    for step in range(3):
      tree = jax.tree.map(lambda x: x * (1 + step) + step * 0.3, tree0)
      if step == 2:  # a new conflict pattern
        tree = _random_tree(t, 20 + t)
      key, step_key = jax.random.split(key)
      orders = np.asarray(_orders_fn(t)(step_key))
      out, state = update(tree, state, params)
      ref, rho = ref_gradvac(_flat(tree), orders, groups, rho, beta)
      _assert_close(_flat_out(out), ref, _flat(tree))
      np.testing.assert_allclose(np.asarray(state.inner), rho, atol=1e-5)
      if granularity == "model":
        _check_weights(state, tree, _flat_out(out))


def test_gradvac_first_step_equals_pcgrad():
  tree = _random_tree(3, 4)
  out_gv, _ = _run("gradvac", tree, key=5, **ALL["gradvac"])
  out_pc, _ = _run("pcgrad", tree, key=5)
  _assert_close(out_gv, out_pc, _flat(tree))


def test_cagrad_other_settings_match_reference():
  tree = _random_tree(3, 11)
  j = _flat(tree)
  for c, rescale in [(0.9, 2)]:
    out, state = _run("cagrad", tree, c=c, rescale=rescale)
    _assert_close(out, ref_cagrad(j, c, rescale), j)
    _check_weights(state, tree, out)


def test_upgrad_equals_pcgrad_for_two_tasks():
  """torchjd's equivalence: UPGrad(pref=1, no normalisation) == PCGrad, T=2."""
  for seed in SEEDS:
    tree = _random_tree(2, seed)
    j = _flat(tree)
    up, _ = _run("upgrad", tree, pref=(1.0, 1.0), reg_eps=0.0)
    _assert_close(up, ref_upgrad(j, (1.0, 1.0), 0.0), j)
    pc, _ = _run("pcgrad", tree, key=seed)
    _assert_close(up, pc, j, tol=1e-6)  # tight: exact solver, no ridge


def test_task_weights_prescale_tasks():
  """task_weights=c gives the method's result on the gradients c_t g_t."""
  c = np.array([0.5, 2.0, 1.0], np.float32)
  tree = _random_tree(3, 13)
  scaled = jax.tree.map(lambda x: x * c.reshape(3, *[1] * (x.ndim - 1)), tree)
  for name, kw in [("mgda", {}), ("pcgrad", {"key": 1}), ("sum", {}),
                   ("cagrad", {})]:
    out_w, st = _run(name, tree, task_weights=c, **kw)
    out_s, _ = _run(name, scaled, **kw)
    _assert_close(out_w, out_s, _flat(scaled))
    _check_weights(st, tree, out_w)


# ----------------------------------------------------------------------------
# Properties (reusing the compiled functions above).
# ----------------------------------------------------------------------------

ALL = {"sum": {}, "mean": {}, "pcgrad": {}, "ags": {},
       "gradvac": {"beta": 0.5, "granularity": "model"},
       "cagrad": {}, "mgda": {}, "imtl_g": {}, "aligned_mtl": {},
       "upgrad": {}, "nash_mtl": {}}
PERMUTATION_INVARIANT = ["sum", "mean", "cagrad", "mgda", "imtl_g",
                         "aligned_mtl", "upgrad", "nash_mtl"]


def _tree_from_matrix(j):
  """Embeds a (T, <=17) matrix into the test tree (zero padded)."""
  t = len(j)
  full = np.zeros((t, 17), np.float32)
  full[:, :j.shape[1]] = j
  return {"a": full[:, :12].reshape(t, 4, 3), "b": full[:, 12:]}


@pytest.mark.parametrize("name,ts", [("mgda", TS), ("upgrad", TS),
                                     ("pcgrad", (2,)), ("ags", (2,))])
def test_result_does_not_conflict_with_any_task(name, ts):
  for t in ts:
    for seed in range(6):
      tree = _random_tree(t, 100 + seed)
      j = _flat(tree)
      out, state = _run(name, tree, **ALL[name])
      dots = j @ out
      tol = 1e-5 * np.max(np.sum(j * j, axis=1))
      if name == "upgrad":  # the ridge (doc): -reg_eps ||g_t||^2 w_t
        tol += 1e-6 * np.sum(j * j, axis=1) * np.asarray(state.weights)
      assert np.all(dots >= -tol), (t, seed, dots)


def test_pcgrad_can_conflict_for_three_tasks():
  """PCGrad's no-conflict guarantee is for T = 2 only (documented)."""
  j = np.array([[0.0, 3.0], [-2.0, 2.0], [1.0, -3.0]])
  out, _ = _run("pcgrad", _tree_from_matrix(j), shuffle=False)
  _assert_close(out[:2], np.array([0.2, 0.4]), j)
  assert (j @ out[:2])[2] < -0.9


@pytest.mark.parametrize("t", TS)
def test_ags_output_norm_equals_plain_sum_norm(t):
  for seed in range(4):
    tree = _random_tree(t, 200 + seed)
    j = _flat(tree)
    out, state = _run("ags", tree, key=seed)
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(j.sum(0)),
                               rtol=1e-5)
    np.testing.assert_allclose(state.norm_ratio, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariance(name):
  tree = _random_tree(3, 300)
  perm = np.array([2, 0, 1])
  permuted = jax.tree.map(lambda x: x[perm], tree)
  out, st = _run(name, tree, **ALL[name])
  out_p, st_p = _run(name, permuted, **ALL[name])
  _assert_close(out_p, out, _flat(tree))
  np.testing.assert_allclose(np.asarray(st_p.weights),
                             np.asarray(st.weights)[perm], atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_positive_homogeneity_and_degenerate_inputs(name):
  """out(a g) = a out(g) (Nash-MTL: out(a g) = out(g), its official
  normalisation); zero / identical / opposite gradients stay finite."""
  tree = _random_tree(3, 400)
  out, _ = _run(name, tree, **ALL[name])
  out2, _ = _run(name, jax.tree.map(lambda x: 3.0 * x, tree), **ALL[name])
  degree = 0 if name == "nash_mtl" else 1
  _assert_close(out2, 3.0**degree * out, 3.0 * _flat(tree))
  g = _random_tree(1, 401, conflict=False)
  cases = {
      "zero": jax.tree.map(lambda x: np.zeros((3, *x.shape[1:]), np.float32),
                           g),
      "identical": jax.tree.map(lambda x: np.repeat(x, 3, axis=0), g),
      "one_zero": jax.tree.map(
          lambda x, y: np.concatenate([x[:2], np.zeros_like(x[:1])]), tree, g),
      "opposite": jax.tree.map(
          lambda x: np.concatenate([x, -x, 2 * x]), g),
  }
  for case, grads in cases.items():
    out, state = _run(name, grads, **ALL[name])
    assert np.all(np.isfinite(out)), (name, case)
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (name, case)
    if case == "zero":
      np.testing.assert_array_equal(out, 0.0)
    if case == "identical" and name not in ("nash_mtl",):
      # every method returns a non-negative multiple of the common gradient
      gv = _flat_out(jax.tree.map(lambda x: x[0], g))
      coef = out @ gv / (gv @ gv)
      _assert_close(out, coef * gv, _flat(grads))
      assert coef >= 0


# ----------------------------------------------------------------------------
# IMTL-G near opposite gradients (regression: a pseudo-inverse of G dropped
# its small eigenvalue there and returned huge updates).
# ----------------------------------------------------------------------------

IMTL_NEAR_OPPOSITE = {
    "collinear_opposite": [[1.0, 0.0], [-0.4, 0.0]],
    "near_opposite": [[1.6022, 6e-4], [-1.5911, 2.3e-3]],
    "near_opposite_t3": [[1.3, 2e-4, 0.0], [-0.9, 1e-3, 0.0],
                         [0.3, 0.5, 0.8]],
    "near_opposite_t3_flat": [[1.3, 2e-4, 0.0], [-0.9, 1e-3, 0.0],
                              [0.3, 0.5, -1e-3]],
}


@pytest.mark.parametrize("case", sorted(IMTL_NEAR_OPPOSITE))
def test_imtl_g_near_opposite_matches_closed_form(case):
  tree = _tree_from_matrix(np.array(IMTL_NEAR_OPPOSITE[case]))
  j = _flat(tree)   # float32-rounded inputs, float64 reference
  out, state = _run("imtl_g", tree)
  alpha = ref_imtl_g_weights(j)
  np.testing.assert_allclose(np.asarray(state.weights), alpha, atol=1e-5)
  _assert_close(out, alpha @ j, j)
  _check_weights(state, tree, out)
  # The defining property: equal projections on every unit task direction.
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  proj = u @ out
  assert np.ptp(proj) <= 1e-5 * np.max(np.linalg.norm(j, axis=1)), proj


def test_imtl_g_collinear_opposite_values():
  """g2 = -0.4 g1: equal projections on u and -u force out = 0."""
  out, state = _run("imtl_g", _tree_from_matrix(np.array(
      IMTL_NEAR_OPPOSITE["collinear_opposite"])))
  np.testing.assert_allclose(np.asarray(state.weights), [2 / 7, 5 / 7],
                             atol=1e-6)
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


@pytest.mark.parametrize("t", (2, 3))
def test_imtl_g_angle_sweep_towards_180_degrees(t):
  """Task 2 at 180 deg - delta from task 1 (other norms, a generic task 3)."""
  rng = np.random.default_rng(7)
  for delta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
    j = np.zeros((t, 17))
    j[0, :2] = [1.7, 0.0]
    j[1, :2] = 0.6 * np.array([-np.cos(delta), np.sin(delta)])
    if t == 3:
      j[2] = rng.normal(size=17)
    tree = _tree_from_matrix(j)
    j = _flat(tree)
    out, state = _run("imtl_g", tree)
    alpha = ref_imtl_g_weights(j)
    assert np.all(np.abs(np.asarray(state.weights)) < 10), (delta, alpha)
    np.testing.assert_allclose(np.asarray(state.weights), alpha, atol=1e-4)
    _assert_close(out, alpha @ j, j)


# ----------------------------------------------------------------------------
# Robustness (issue 19): non-finite inputs, extreme float32 scales, wide norm
# spreads and common rescaling in float64 (apply_if_finite: wrappers_test).
# ----------------------------------------------------------------------------

MIXING = [n for n in ALL if n not in ("sum", "mean")]
DEGREE = {n: 0 if n == "nash_mtl" else 1 for n in ALL}  # out(a g) = a^d out(g)


@pytest.mark.parametrize("name", sorted(ALL))
def test_non_finite_input_gives_nan_output_and_keeps_state(name):
  """Documented policy: NaN/inf in, NaN out (never a finite fallback)."""
  tree = _random_tree(3, 500)
  t = 3
  tx, update = _jitted(name, num_tasks=t, **ALL[name])
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  init = tx.init(params)
  for bad in (np.nan, np.inf, -np.inf):
    g = jax.tree.map(np.copy, tree)
    g["a"][1, 2, 1] = bad
    out, state = update(g, init, params, task_weights=np.ones(t, np.float32))
    flat = _flat_out(out)
    assert not np.any(np.isinf(flat)), (name, bad)
    if name in MIXING:
      assert np.all(np.isnan(flat)), (name, bad)
    else:  # sum/mean: NaN exactly where the bad entry was
      bad_at = np.isnan(flat)
      assert bad_at.sum() == 1 and bad_at[2 * 3 + 1], (name, bad)
    jax.tree.map(np.testing.assert_array_equal, state.inner, init.inner)


@pytest.mark.parametrize("name", sorted(ALL))
def test_float32_gradients_near_overflow_and_underflow(name):
  """Squared norms of 1e40 (overflow) or 1e-40 (underflow) in float32."""
  tree = _random_tree(3, 600)
  ref, _ = _run(name, tree, **ALL[name])
  for scale in (1e20, 1e-20):
    scaled = jax.tree.map(lambda x: (x * np.float32(scale)).astype(np.float32),
                          tree)
    out, state = _run(name, scaled, **ALL[name])
    got = out / scale**DEGREE[name]
    assert np.all(np.isfinite(got)), (name, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4,
                               atol=1e-4 * np.max(np.abs(ref)))


# --- float64 (x64) ----------------------------------------------------------

T64, D64 = 5, 10


@functools.lru_cache(maxsize=None)
def _jitted64(name, **kwargs):
  with jax.enable_x64(True):
    tx = surgery.get(name, num_tasks=T64, **kwargs)
    return tx, jax.jit(tx.update)


def _run64(name, j, **kwargs):
  """Method ``name`` on the float64 (T64, D64) matrix ``j``: (out, state)."""
  if name in _RANDOM:
    kwargs = dict(kwargs, key=0)
  with jax.enable_x64(True):
    tx, update = _jitted64(name, **kwargs)
    params = {"w": jnp.zeros(D64, jnp.float64)}
    out, state = update({"w": jnp.asarray(j, jnp.float64)}, tx.init(params),
                        params)
    return np.asarray(out["w"]), state


def _spread_matrix(spread, seed):
  """Random T64 x D64 gradients with norms log-spaced over ``spread``."""
  rng = np.random.default_rng(seed)
  j = rng.normal(size=(T64, D64))
  j[-1] -= 1.5 * j[0]
  j /= np.linalg.norm(j, axis=1, keepdims=True)
  return j * rng.permutation(np.geomspace(1.0, spread, T64))[:, None]


def _scipy_simplex_min(f, t, x0s=()):
  best = np.inf
  for x0 in [np.ones(t) / t, *np.eye(t) * 0.9 + 0.1 / t, *x0s]:
    res = scipy.optimize.minimize(
        f, x0, bounds=[(0, 1)] * t, method="SLSQP",
        constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
        options={"ftol": 1e-16, "maxiter": 2000})
    best = min(best, f(np.clip(res.x, 0, 1) / np.sum(np.clip(res.x, 0, 1))))
  return best


@pytest.mark.parametrize("spread", [1e3, 1e4, 1e6])
def test_mgda_and_cagrad_at_wide_norm_spreads_match_scipy(spread):
  """Objectives within 1e-4 (relative) of scipy's optimum (issue 19)."""
  c = 0.5
  for seed in range(4):
    j = _spread_matrix(spread, seed)
    g = j @ j.T
    s = np.max(np.diag(g))  # scipy works on G / max diag
    # MGDA: min over the simplex of ||J^T w||^2; ours is ||out||^2.
    out, _ = _run64("mgda", j)
    opt = s * _scipy_simplex_min(lambda w: w @ (g / s) @ w, T64)
    assert out @ out <= opt * (1 + 1e-4), (spread, seed, out @ out / opt)
    # CAGrad: min_w <g_w, g0> + c ||g0|| ||g_w|| equals the worst task's
    # improvement min_t <g_t, d> of the returned d (before the rescale).
    out, _ = _run64("cagrad", j)
    d = out * (1 + c**2)
    cn = c * np.sqrt(g.mean())
    b = g.mean(1)
    f = lambda w: (w @ b + cn * np.sqrt(max(w @ g @ w, 0.0))) / s
    opt = s * _scipy_simplex_min(f, T64)
    got = np.min(j @ d)
    assert got >= opt - 1e-4 * abs(opt), (spread, seed, got, opt)


@pytest.mark.parametrize("name", sorted(ALL))
def test_common_rescaling_invariance_float64(name):
  """out(a g) = a^d out(g) for a from 1e-12 to 1e12 (weights unchanged)."""
  j = _spread_matrix(1e2, 7)
  ref, _ = _run64(name, j, **ALL[name])
  for a in (1e-12, 1e-6, 1e6, 1e12):
    out, _ = _run64(name, j * a, **ALL[name])
    np.testing.assert_allclose(out / a**DEGREE[name], ref, rtol=1e-9,
                               atol=1e-9 * np.max(np.abs(ref)))


def test_upgrad_exact_at_wide_spreads_float64():
  """reg_eps=0: no residual conflict; T=2 equals PCGrad to 1e-10."""
  for seed in range(3):
    j = _spread_matrix(1e3, seed)
    out, state = _run64("upgrad", j, reg_eps=0.0)
    dots = j @ out / np.sum(j * j, axis=1)
    assert np.all(dots >= -1e-10), dots
  j = _spread_matrix(1e3, 3)
  j2 = np.zeros_like(j)
  j2[:2] = j[:2]  # T=2 embedded: tasks 3..5 zero
  rng = np.random.default_rng(0)
  for _ in range(3):
    a, b = rng.normal(size=(2, D64)) * np.array([[1e-2], [1e2]])
    a -= 1.2 * (a @ b) / (b @ b) * b  # conflicting
    up = ref_upgrad(np.stack([a, b]), (1.0, 1.0), 0.0)
    pc = ref_pcgrad(np.stack([a, b]), [[1], [0]])
    np.testing.assert_allclose(up, pc, rtol=1e-10, atol=1e-12)


def test_float64_state_and_preferences_stay_float64():
  j = _spread_matrix(10.0, 1)
  _, state = _run64("gradvac", j, beta=0.5, granularity="model")
  assert state.inner.dtype == jnp.float64
  for name in ("upgrad", "aligned_mtl"):
    base, _ = _run64(name, j, pref=(1.0,) * T64)
    out, _ = _run64(name, j, pref=(0.1,) * T64)  # 0.1 is not a float32
    np.testing.assert_allclose(out, 0.1 * base, rtol=1e-13, atol=1e-15)
